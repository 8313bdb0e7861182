"""`nanoseek serve`: an OpenAI-compatible HTTP server and a web chat page over one continuously batched engine.

    nanoseek serve runs/demo --port 8000 [--api-key KEY]
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "stream": true}'

Threads: uvicorn's event loop answers HTTP; one engine thread (EngineLoop) owns the Engine and runs its step
loop, so every running request shares one batch (continuous batching: requests join and leave between
steps). Requests reach the engine thread through a queue; its events come back through each request's
asyncio.Queue. A client that goes away (or a stream that is closed) aborts its sequences, which frees their
cache slots at once. At most max_batch sequences run; up to max_queue more wait; beyond that: 429.

The text between <think> and </think> is returned as `reasoning_content`, the rest as `content`, as
DeepSeek's own API does. Errors are OpenAI error objects: {"error": {"message", "type", "param", "code"}}.
"""

import argparse
import asyncio
import codecs
import hmac
import json
import math
import os
import queue
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from nanoseek.chat import TextStream, text_end_ids, turn_end_ids
from nanoseek.engine import MAX_TOP_LOGPROBS, Engine, Event, PromptLogprobs, SamplingParams
from nanoseek.errors import UserError
from nanoseek.tokenizer import END_THINK, THINK

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
API_KEY_ENV = "NANOSEEK_API_KEY"
MAX_STOPS = 16
UNION_MEMBER = re.compile(r"(str|int|float|bool|dict|list|tuple)(\[.*\])?")  # as pydantic names them in an error


class APIError(Exception):
    """An error answered as an OpenAI error object."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# --- the engine thread ---------------------------------------------------------------------------------------

@dataclass
class Handle:
    """One HTTP request's sequences (n choices) in the engine: events arrive as (choice index, Event)."""

    jobs: list[tuple[list[int], SamplingParams]]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    request_ids: dict[int, int] = field(default_factory=dict)  # engine request id -> choice index
    finished: int = 0  # choices that have had their last event
    released: bool = False


class EngineLoop:
    """Owns the engine in its own thread: adds and aborts requests between steps, steps while there is work,
    and sleeps when there is none."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.capacity = engine, engine.cache.max_batch + max_queue
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.handles: dict[int, Handle] = {}  # engine request id -> its handle
        self.outstanding = 0  # sequences submitted and not finished or aborted (counted on the event loop)
        self.stats = {"requests": 0, "completion_tokens": 0, "prompt_tokens": 0, "steps": 0, "step_seconds": 0.0,
                      "started": time.time()}
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens/s
        self.running_batch = 0
        self.waiting = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self.thread.start()

    # called on the event loop
    def submit(self, handle: Handle) -> None:
        if len(handle.jobs) > self.capacity:
            raise APIError(400, f"the request asks for {len(handle.jobs)} sequences (prompts x n); this server runs "
                                f"or queues at most {self.capacity}", param="n", code="too_many_sequences")
        if self.outstanding + len(handle.jobs) > self.capacity:
            raise APIError(429, f"the server is at capacity ({self.capacity} sequences running or queued); "
                                "retry later", code="queue_full")
        self.outstanding += len(handle.jobs)
        self.stats["requests"] += 1
        self.inbox.put(("add", handle))

    def release(self, handle: Handle) -> None:
        """The request is over (finished, failed or its client left): abort what still runs. Once per handle."""
        if handle.released:
            return
        handle.released = True
        self.outstanding -= len(handle.jobs)
        if handle.finished < len(handle.jobs):
            self.inbox.put(("abort", handle))

    def stop(self) -> None:
        self.stopped = True
        self.inbox.put(("stop", None))
        self.thread.join(timeout=10)

    # the engine thread
    def _run(self) -> None:
        while not self.stopped:
            block = not self.engine.has_work()
            try:
                while True:
                    self._command(*self.inbox.get(block=block, timeout=0.5 if block else None))
                    block = False
            except queue.Empty:
                pass
            self.running_batch, self.waiting = len(self.engine.running), len(self.engine.waiting)
            if not self.engine.has_work():
                continue
            t = time.perf_counter()
            try:
                events = self.engine.step()
            except Exception as e:  # a bug, not bad input (that is rejected before it reaches the engine)
                self._fail(f"the engine failed: {type(e).__name__}: {e}", ended_only=True)
                continue
            self.stats["steps"] += 1
            self.stats["step_seconds"] += time.perf_counter() - t
            self.running_batch, self.waiting = len(self.engine.running), len(self.engine.waiting)
            now = time.time()
            self.recent.append((now, len(events)))
            while self.recent and now - self.recent[0][0] > 10:
                self.recent.popleft()
            deliveries: dict[asyncio.AbstractEventLoop, list] = {}  # one wake-up per event loop per step
            for ev in events:
                handle = self.handles.get(ev.request_id)
                if handle is None:
                    continue
                if ev.finish_reason is not None:
                    del self.handles[ev.request_id]
                deliveries.setdefault(handle.loop, []).append((handle, (handle.request_ids[ev.request_id], ev)))
            for loop, items in deliveries.items():
                loop.call_soon_threadsafe(_deliver, items)
        self._fail("the server is shutting down")

    def _command(self, kind: str, handle: Handle | None) -> None:
        if kind == "add":
            for index, (prompt, params) in enumerate(handle.jobs):
                try:
                    rid = self.engine.add_request(prompt, params)
                except Exception as e:  # noqa: BLE001 - checked before submission; the engine thread must live on
                    handle.loop.call_soon_threadsafe(handle.events.put_nowait, (index, e))
                    continue
                handle.request_ids[rid] = index
                self.handles[rid] = handle
        elif kind == "abort":
            for rid in handle.request_ids:
                if self.handles.pop(rid, None) is not None:
                    self.engine.abort(rid)
        elif kind == "stop":
            self.stopped = True

    def _fail(self, message: str, ended_only: bool = False) -> None:
        """Fail the requests: all of them (shutdown), or after a step that raised only those it ended (its running
        sequences; the engine goes on with the queued ones)."""
        for rid, handle in list(self.handles.items()):
            if ended_only and rid in self.engine.sequences:
                continue
            self.engine.abort(rid)
            del self.handles[rid]
            handle.loop.call_soon_threadsafe(handle.events.put_nowait, (handle.request_ids[rid], RuntimeError(message)))

    def tokens_per_s(self, window: float = 10.0) -> float:
        """Tokens generated per second over the last `window` seconds (0 when idle)."""
        now = time.time()
        window = min(window, now - self.stats["started"])
        return sum(n for t, n in list(self.recent) if now - t <= window) / max(window, 1e-3)


def _deliver(items: list) -> None:
    for handle, item in items:
        handle.events.put_nowait(item)


# --- text: reasoning split and streaming deltas ----------------------------------------------------------------

def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, content): a reply that opens with <think> keeps its reasoning up to </think>."""
    stripped = text.lstrip()
    if not stripped.startswith(THINK):
        return None, text
    reasoning, closed, content = stripped[len(THINK):].partition(END_THINK)
    return reasoning.strip("\n"), content.lstrip() if closed else ""


def _finite(logprob: float) -> float:
    """JSON has no -inf: a token the model rules out entirely gets OpenAI's floor of -9999."""
    return logprob if math.isfinite(logprob) else -9999.0


@dataclass
class Echo:
    """A completion that starts with its prompt (`echo`): the prompt's text and ids; `skip` leading ids (the BOS
    the server put in front of a text prompt) are not part of it."""

    text: str
    ids: list[int]
    skip: int


class ChoiceText:
    """One choice's text as it streams: token ids in, (reasoning delta, content delta) out; with `logprobs`, the
    log-probs of its tokens (of the echoed prompt's too) as OpenAI's chat or completions API writes them.

    chat: the reasoning is split off the content, and the turn-end tokens are left out of the log-probs (they are
    not part of the message); completions list every generated token, a stop token too (scorers such as
    lm-evaluation-harness expect one entry per generated token after the echoed prompt)."""

    def __init__(self, tokenizer, stops: list[str], stop_ids: list[int], chat: bool, logprobs: bool = False,
                 echo: Echo | None = None):
        self.tokenizer = tokenizer
        self.stream, self.stop_ids, self.chat = TextStream(tokenizer, stops), set(stop_ids), chat
        self.sent_reasoning = self.sent_content = 0
        self.tokens = 0
        self.finish_reason: str | None = None
        self.echo = echo
        # (token, log-prob or None for an unscored first prompt token, alternatives)
        self.logprobs: list[tuple[int, float | None, list | None]] | None = [] if logprobs else None
        self.sent_logprobs = 0
        self.offset, self.utf8 = 0, codecs.getincrementaldecoder("utf-8")("replace")  # completions' text_offset

    def add(self, ev: Event) -> tuple[str, str]:
        self.tokens += 1
        if self.logprobs is not None:
            if ev.prompt_logprobs is not None and self.echo is not None:
                self.logprobs += self._prompt_entries(ev.prompt_logprobs)
            if not (self.chat and ev.token in self.stop_ids):
                self.logprobs.append((ev.token, ev.logprob, ev.top_logprobs or []))
        if ev.token not in self.stop_ids:
            self.stream.add(ev.token)
        final = ev.finish_reason is not None
        if final:
            self.finish_reason = ev.finish_reason
            self.stream.finish()
        reasoning, content = self._deltas(self.stream.full[: self.stream.shown], final)
        if self.echo is not None and self.tokens == 1:
            content = self.echo.text + content
        return reasoning, content

    def _prompt_entries(self, scores: PromptLogprobs) -> list:
        """The echoed prompt's tokens: entry i of the scores is about prompt token i + 1."""
        tops = scores.top_logprobs or [[]] * len(scores.logprobs)
        entries = [(self.echo.ids[0], None, None), *zip(self.echo.ids[1:], scores.logprobs, tops)]
        return entries[self.echo.skip:]

    def new_logprobs(self) -> list:
        """The log-prob entries not sent yet (a stream sends them with the next chunk)."""
        new = (self.logprobs or [])[self.sent_logprobs:]
        self.sent_logprobs += len(new)
        return new

    def _text(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def _token(self, token: int, logprob: float) -> dict:
        return {"token": self._text(token), "logprob": _finite(logprob),
                "bytes": list(self.tokenizer.token_bytes(token))}

    def chat_logprobs(self, entries: list) -> list[dict]:
        """Chat completions' `logprobs.content`: token, logprob, bytes and top_logprobs per token."""
        return [{**self._token(t, lp), "top_logprobs": [self._token(a, alp) for a, alp in top]}
                for t, lp, top in entries]

    def completion_logprobs(self, entries: list) -> dict:
        """Completions' `logprobs`: parallel lists of the tokens, their log-probs, {token: log-prob} of the most
        likely and the chosen one (null for an unscored first token), and each token's character offset in the
        text (a character split over tokens starts at the first)."""
        tokens, offsets, tops = [], [], []
        for t, lp, top in entries:
            tokens.append(self._text(t))
            offsets.append(self.offset)
            self.offset += len(self.utf8.decode(self.tokenizer.token_bytes(t)))
            if lp is None:
                tops.append(None)
                continue
            tops.append({})
            for a, alp in [*top, (t, lp)]:  # tokens that read the same keep the likelier one's log-prob
                tops[-1].setdefault(self._text(a), _finite(alp))
        return {"tokens": tokens, "token_logprobs": [None if lp is None else _finite(lp) for _, lp, _ in entries],
                "top_logprobs": tops, "text_offset": offsets}

    def _deltas(self, text: str, final: bool) -> tuple[str, str]:
        if not self.chat:
            return "", self._take_content(text)
        if not final:  # hold back what may be the start of a tag
            for tag in (THINK, END_THINK):
                for k in range(len(tag) - 1, 0, -1):
                    if text.endswith(tag[:k]):
                        text = text[:-k]
                        break
        if not final and not text.strip():  # leading blanks: wait to see whether <think> follows
            return "", ""
        reasoning, content = split_reasoning(text)
        r = (reasoning or "")[self.sent_reasoning:]
        self.sent_reasoning += len(r)
        return r, self._take_content(content)

    def _take_content(self, content: str) -> str:
        new = content[self.sent_content:]
        self.sent_content = max(self.sent_content, len(content))
        return new

    def full(self) -> tuple[str | None, str]:
        text = self.stream.text()
        if self.chat:
            return split_reasoning(text)
        return None, (self.echo.text if self.echo is not None else "") + text


# --- request bodies -----------------------------------------------------------------------------------------------

def _schemas():
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")  # accept (and ignore) OpenAI fields we do not implement
        model: str | None = None
        n: int = Field(1, ge=1, le=16)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int = Field(0, ge=0)
        presence_penalty: float = Field(0.0, ge=-2, le=2)
        frequency_penalty: float = Field(0.0, ge=-2, le=2)
        repetition_penalty: float = Field(1.0, gt=0)  # vLLM's extra parameter
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        logprobs: bool | int | None = None  # chat: a boolean; completions: how many alternatives per token
        top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # chat only
        echo: bool | None = None  # completions only
        best_of: int | None = None
        # not implemented: refused (400) unless absent or at their neutral value
        response_format: dict | None = None
        logit_bias: dict | None = None
        tools: list | None = None
        suffix: str | None = None

        @model_validator(mode="before")
        @classmethod
        def _null_is_default(cls, data):  # OpenAI documents these as nullable: null means the default
            nullable = ("n", "temperature", "top_p", "top_k", "stream", "presence_penalty", "frequency_penalty",
                        "repetition_penalty")
            if isinstance(data, dict):
                return {k: v for k, v in data.items() if v is not None or k not in nullable}
            return data

    class Message(BaseModel):
        role: Literal["system", "user", "assistant", "developer"]
        content: str | list[dict] | None = None

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1)
        default_max_tokens: ClassVar[int | None] = None  # chat: as many as the context leaves

    class CompletionRequest(Sampling):
        prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids as they are (no BOS added)
        default_max_tokens: ClassVar[int | None] = 16  # OpenAI's legacy completions (and vLLM's) default

    return ChatRequest, CompletionRequest


def _message_text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts only)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


@dataclass
class Plan:
    """A request as engine jobs (one per choice: prompts x n) and what its answer needs."""

    jobs: list[tuple[list[int], SamplingParams]]
    prompt_tokens: int
    stops: list[str]
    stop_ids: list[int]
    logprobs: int | None = None
    """Alternatives per token when log-probs were asked for; None: not asked."""
    echoes: list[Echo] | None = None
    """Completions with `echo`: the prompt of each job."""


# --- the app -------------------------------------------------------------------------------------------------------

class Server:
    """The state behind the HTTP app: model name, tokenizer, engine loop, limits."""

    def __init__(self, model, tokenizer, name: str, api_key: str | None = None, max_batch: int = 16,
                 max_queue: int = 256, max_body_bytes: int = 1 << 20, engine_kwargs: dict | None = None):
        if tokenizer is None:
            raise UserError("serving needs a tokenizer.json next to the model")
        self.name, self.tokenizer, self.api_key, self.max_body_bytes = name, tokenizer, api_key, max_body_bytes
        self.engine = Engine(model, max_batch=max_batch, **(engine_kwargs or {}))
        if self.engine.compile:  # before the engine thread starts: it owns the engine from then on
            self.engine.warm_up()
        self.loop = EngineLoop(self.engine, max_queue)
        self.created = int(time.time())

    def close(self) -> None:
        self.loop.stop()

    # request -> engine jobs
    def _params(self, req, prompt_len: int, stop_ids: list[int], stops: list[str], index: int,
                logprobs: int | None = None, score_prompt: bool = False) -> SamplingParams:
        room = self.engine.max_len - prompt_len
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is not None and max_tokens > room:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{param}={max_tokens} is too large: the prompt has {prompt_len} tokens and the "
                                f"context holds {self.engine.max_len}, so at most {room} can be generated",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:  # chat: as many as the context leaves; completions: 16, as OpenAI's and vLLM's
            max_tokens = min(req.default_max_tokens or room, room)
        seed = None if req.seed is None else req.seed + index
        stop_check = self.tokenizer.stop_check(stops) if stops else None
        return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              repetition_penalty=req.repetition_penalty, max_new_tokens=max_tokens,
                              stop_token_ids=stop_ids, seed=seed, stop_check=stop_check,
                              top_logprobs=logprobs or 0, prompt_logprobs=score_prompt)

    def _check_prompt(self, ids: list[int], param: str) -> None:
        if len(ids) >= self.engine.max_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens but the context holds {self.engine.max_len} "
                                "(prompt + completion); shorten it", param=param, code="context_length_exceeded")

    def _stops(self, req) -> list[str]:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):  # (OpenAI takes 4; evaluation harnesses send more)
            raise APIError(400, f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
        try:
            for s in stops:
                s.encode()
        except UnicodeEncodeError:
            raise APIError(400, "stop is not valid Unicode (it holds a lone surrogate)", param="stop") from None
        return stops

    def _check_request(self, req, chat: bool) -> int | None:
        """Refuse what this server cannot answer (rather than answer without it); -> the alternatives per token
        when log-probs are asked for, else None."""
        unsupported = {"best_of": (req.best_of or 1) > 1, "echo": chat and bool(req.echo),
                       "response_format": (req.response_format or {}).get("type", "text") != "text",
                       "logit_bias": bool(req.logit_bias), "tools": bool(req.tools), "suffix": bool(req.suffix)}
        for name, asked in unsupported.items():
            if asked:
                raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options", code="invalid_value")
        if req.model not in (None, "", self.name):
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        if chat:  # logprobs: true, and top_logprobs alternatives
            if req.logprobs is not None and not isinstance(req.logprobs, bool):
                raise APIError(400, "logprobs is a boolean in chat completions (top_logprobs asks for alternatives)",
                               param="logprobs", code="invalid_value")
            if req.top_logprobs and not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
            return (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None:
            raise APIError(400, "completions take the number of alternatives as logprobs, not top_logprobs",
                           param="top_logprobs", code="invalid_value")
        if req.logprobs is None or req.logprobs is False:
            return None
        if req.logprobs is True or not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"logprobs must be an integer in 0..{MAX_TOP_LOGPROBS} (alternatives per token)",
                           param="logprobs", code="invalid_value")
        return req.logprobs

    def chat_jobs(self, req) -> Plan:
        logprobs = self._check_request(req, chat=True)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m.content)}
                    for m in req.messages]
        try:
            ids, _ = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        self._check_prompt(ids, "messages")
        stops, stop_ids = self._stops(req), turn_end_ids(self.tokenizer)
        jobs = [(ids, self._params(req, len(ids), stop_ids, stops, i, logprobs)) for i in range(req.n)]
        return Plan(jobs, len(ids), stops, stop_ids, logprobs)

    def completion_jobs(self, req) -> Plan:
        logprobs = self._check_request(req, chat=False)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt: a string or a list of token ids
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of token ids (or a list of them)",
                           param="prompt")
        stops, stop_ids = self._stops(req), text_end_ids(self.tokenizer)
        plan = Plan([], 0, stops, stop_ids, logprobs, [] if req.echo else None)
        V = self.engine.model.config.vocab_size
        score = bool(req.echo) and logprobs is not None  # the echoed prompt's log-probs
        for p in prompts:
            if isinstance(p, str):
                ids, added = self.tokenizer.encode(p, bos=True), int(self.tokenizer.bos_id is not None)
            else:
                if not all(0 <= t < V for t in p):
                    raise APIError(400, f"prompt token ids must be in 0..{V - 1}", param="prompt",
                                   code="invalid_value")
                ids, added = list(p), 0
            self._check_prompt(ids, "prompt")
            plan.prompt_tokens += len(ids)
            plan.jobs += [(ids, self._params(req, len(ids), stop_ids, stops, i, logprobs, score)) for i in range(req.n)]
            if req.echo:
                text = p if isinstance(p, str) else self.tokenizer.decode(ids)  # a prompt of ids echoes as its text
                plan.echoes += [Echo(text, ids, added)] * req.n
        return plan

    def metrics(self) -> dict:
        s = self.loop.stats
        return {"requests_total": s["requests"], "prompt_tokens_total": s["prompt_tokens"],
                "completion_tokens_total": s["completion_tokens"], "tokens_per_s": round(self.loop.tokens_per_s(), 2),
                "running_batch": self.loop.running_batch, "queue_depth": self.loop.waiting,
                "sequences_outstanding": self.loop.outstanding, "max_batch": self.engine.cache.max_batch,
                "capacity": self.loop.capacity, "engine_steps_total": s["steps"],
                "engine_step_seconds_total": round(s["step_seconds"], 3),
                "uptime_s": round(time.time() - s["started"], 1)}


def create_app(server: Server):
    """The FastAPI app over a Server: OpenAI routes, /health, /metrics and the web page at /."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    ChatRequest, CompletionRequest = _schemas()

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(UserError)
    async def _user_error(request, e: UserError):  # e.g. sampling parameters the engine refuses
        return error(APIError(400, str(e)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return error(_validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        status = e.status_code if e.status_code in APIError.TYPES else 400
        message = "not found" if e.status_code == 404 else str(e.detail)
        return error(APIError(status, f"{request.method} {request.url.path}: {message}"))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):  # never a traceback in a response
        return error(APIError(500, f"internal error ({type(e).__name__})"))

    async def body_of(request: Request, schema):
        data = bytearray()  # chunked bodies have no content-length: bound them while they arrive
        async for chunk in request.stream():
            data += chunk
            if len(data) > server.max_body_bytes:
                raise APIError(413, f"the request body exceeds {server.max_body_bytes} bytes",
                               code="request_too_large")
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):  # (RecursionError: nested thousands deep)
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(raw, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return schema.model_validate(raw)
        except ValidationError as e:
            raise _validation_error(e.errors()) from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name, "auth": bool(server.api_key)}

    @app.get("/metrics")
    async def metrics():
        return server.metrics()

    @app.get("/")
    async def page():
        return FileResponse(WEB_PAGE, media_type="text/html")

    def model_card() -> dict:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "nanoseek"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != server.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {server.name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await body_of(request, ChatRequest)
        return await respond(request, req, server.chat_jobs(req), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await body_of(request, CompletionRequest)
        return await respond(request, req, server.completion_jobs(req), chat=False)

    class ReleasingStream(StreamingResponse):
        """A streamed answer that releases its request when the response ends, however it ends (also when its
        body never started: the client left first)."""

        def __init__(self, content, handle: Handle, **kw):
            super().__init__(content, **kw)
            self.handle = handle

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                server.loop.release(self.handle)

    async def respond(request, req, plan: Plan, chat: bool):
        handle = Handle(plan.jobs, asyncio.get_running_loop())
        server.loop.submit(handle)
        response = None
        try:
            response = await _respond(request, req, plan, chat, handle)
            return response
        finally:
            if not isinstance(response, ReleasingStream):  # (a stream releases its request when it ends)
                server.loop.release(handle)

    async def _respond(request, req, plan: Plan, chat: bool, handle: Handle):
        jobs = plan.jobs
        server.loop.stats["prompt_tokens"] += plan.prompt_tokens
        texts = [ChoiceText(server.tokenizer, plan.stops, plan.stop_ids, chat=chat,
                            logprobs=plan.logprobs is not None, echo=plan.echoes[i] if plan.echoes else None)
                 for i in range(len(jobs))]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        usage = lambda: {"prompt_tokens": plan.prompt_tokens, "completion_tokens": sum(t.tokens for t in texts),
                         "total_tokens": plan.prompt_tokens + sum(t.tokens for t in texts)}

        def logprobs(t: ChoiceText, entries: list):
            """A choice's `logprobs` field for these entries (None when not asked for)."""
            if plan.logprobs is None:
                return None
            if chat:
                return {"content": t.chat_logprobs(entries), "refusal": None}
            return t.completion_logprobs(entries)

        async def events():
            """(index, reasoning delta, content delta, finish_reason) until every choice has finished."""
            while handle.finished < len(jobs):
                index, ev = await handle.events.get()
                if isinstance(ev, Exception):
                    raise APIError(400 if isinstance(ev, UserError) else 500, str(ev))
                r, c = texts[index].add(ev)
                server.loop.stats["completion_tokens"] += 1
                handle.finished += ev.finish_reason is not None
                yield index, r, c, ev.finish_reason

        if not req.stream:
            async def drain():
                async for _ in events():
                    pass

            task = asyncio.ensure_future(drain())
            while not task.done():  # a client that leaves frees its sequences (a stream notices by itself)
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
                    return Response(status_code=499)
            task.result()  # an APIError of the engine
            choices = []
            for i, t in enumerate(texts):
                reasoning, content = t.full()
                if chat:
                    # reasoning_content always, null without a <think> part (as DeepSeek's API and vLLM): clients
                    # read it as an attribute
                    message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
                    choices.append({"index": i, "message": message, "finish_reason": t.finish_reason,
                                    "logprobs": logprobs(t, t.new_logprobs())})
                else:
                    choices.append({"index": i, "text": content, "finish_reason": t.finish_reason,
                                    "logprobs": logprobs(t, t.new_logprobs())})
            return {"id": rid, "object": obj, "created": created, "model": server.name, "choices": choices,
                    "usage": usage()}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra) -> str:
            body = {"id": rid, "object": chunk_obj, "created": created, "model": server.name, "choices": choices}
            body.update(extra)
            return f"data: {json.dumps(body)}\n\n"

        async def sse():
            if chat:  # the first chunk of each choice names the role
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in range(len(jobs))])
            try:
                async for index, r, c, reason in events():
                    if not (r or c or reason):
                        continue
                    if chat:
                        delta = {}
                        if r:
                            delta["reasoning_content"] = r
                        if c or not r:
                            delta["content"] = c
                        choice = {"index": index, "delta": delta, "finish_reason": reason}
                    else:
                        choice = {"index": index, "text": c, "finish_reason": reason}
                    if plan.logprobs is not None:  # the tokens since the last chunk (held-back text included)
                        choice["logprobs"] = logprobs(texts[index], texts[index].new_logprobs())
                    yield chunk([choice])
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            if include_usage:
                yield chunk([], usage=usage())
            yield "data: [DONE]\n\n"

        return ReleasingStream(sse(), handle, media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.add_middleware(Guard, server=server)
    return app


def _validation_error(errors: list[dict]) -> APIError:
    """pydantic's first complaint as a 400 naming the field (OpenAI answers invalid values with 400)."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    where = ".".join(loc) or None
    # the field without the union member pydantic tried ("stop.list[str].0" -> "stop")
    field = next((i for i, x in enumerate(loc) if UNION_MEMBER.fullmatch(x)), len(loc))
    return APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}",
                    param=".".join(loc[:field]) or None, code="invalid_value")


class Guard:
    """ASGI middleware run before any route: the body size limit (by Content-Length; bodies without one are
    bounded when read) and the bearer API key on /v1/*."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            problem = self.check(scope, headers)
            if problem is not None:
                from fastapi.responses import JSONResponse

                await JSONResponse(problem.body(), status_code=problem.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope, headers: dict) -> APIError | None:
        limit = self.server.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        key = self.server.api_key
        if key and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                code="invalid_api_key")
        return None


# --- `nanoseek serve` ------------------------------------------------------------------------------------------------

def add_serve_arguments(p) -> None:
    p.add_argument("path", help="run directory, checkpoint directory or transformers DeepseekV3 directory "
                                "(with tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--name", help="the model name clients use (default: the directory's name)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default: 32)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences waiting beyond that before 429")
    p.add_argument("--max-body-kb", type=int, default=1024, help="request body limit in KiB (default: 1024)")
    p.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="decode through torch.compile (default: on; the graphs compile before the server listens, "
                        "~1 min the first time, seconds once torch has cached them)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="matmul weights of the engine's fast path (default: bfloat16; compiled, faster than float32 "
                        "at every batch size on this CPU; float32 is exact)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="torch threads for the engine (default: all cores but one, which the HTTP event loop "
                        "needs; on 2 cores this doubled throughput)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def build_server(args) -> Server:
    from nanoseek import load
    from nanoseek.cli import pick_device

    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} must be in 0..65535")
    if args.max_batch < 1 or args.max_queue < 0 or args.max_body_kb < 1 or args.threads < 1:
        raise UserError("--max-batch, --max-body-kb and --threads must be >= 1, --max-queue >= 0")
    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.path, pick_device(args.device))
    name = args.name or Path(args.path).resolve().name
    compile = args.compile and model.config.attention_type == "mla"  # (the dense MHA baseline decodes eagerly)
    if compile:
        print("compiling the decode steps (torch.compile; --no-compile skips it) ...", flush=True)
    return Server(model, tokenizer, name, api_key=args.api_key or None, max_batch=args.max_batch,
                  max_queue=args.max_queue, max_body_bytes=args.max_body_kb * 1024,
                  engine_kwargs={"speculative": args.speculative, "dtype": getattr(torch, args.dtype),
                                 "compile": compile})


def _listen(host: str, port: int):
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections made before uvicorn runs wait in the backlog
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def _url(sock) -> str:
    """The base URL of a listening socket (an IPv6 address in brackets: http://[::1]:8000)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn(server: Server):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", timeout_graceful_shutdown=2))


@contextmanager
def serving(server: Server, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve in a background thread (tests, benchmarks, notebooks); yields the base URL, e.g.
    http://127.0.0.1:41234, and stops the server (and its engine thread) on exit."""
    sock = _listen(host, port)
    web = _uvicorn(server)
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not web.started:
        if not thread.is_alive():
            raise RuntimeError("the server failed to start")
        time.sleep(0.01)
    try:
        yield _url(sock)
    finally:
        web.should_exit = True
        thread.join(timeout=10)
        server.close()
        sock.close()


def run_serve(args) -> None:
    server = build_server(args)
    try:
        sock = _listen(args.host, args.port)
    except UserError:
        server.close()
        raise
    print(f"nanoseek serving {server.name!r} on {_url(sock)}  (OpenAI API at /v1, chat page at /; "
          f"{'API key required' if server.api_key else 'no API key'})", flush=True)
    _uvicorn(server).run(sockets=[sock])
