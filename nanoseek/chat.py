"""`nanoseek generate` (one prompt -> text) and `nanoseek chat` (a streaming REPL), on top of the engine.

    nanoseek generate runs/demo "The king said" --max-new-tokens 64 --json
    nanoseek chat runs/demo --system "You are nanoseek."

Both load a run directory (its newest stage), a checkpoint directory or an exported transformers directory.
Context overflow: `generate` refuses a prompt that does not fit (one-line error); `chat` drops the oldest
exchanges of the conversation until it fits, and says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time

from nanoseek.errors import UserError

DIM, RESET = "\033[2m", "\033[0m"
THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


def _common_arguments(p, max_new_tokens: int) -> None:
    p.add_argument("path", help="run directory, checkpoint directory or exported transformers directory")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    g.add_argument("--top-k", type=int, default=50, help="0 disables it (default: 50)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1, off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divides the logits of tokens already seen (transformers' and vLLM's; above 1, e.g. 1.3, "
                        "breaks the loops of a small model; default: 1, off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's presence penalty (-2..2)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's frequency penalty (-2..2)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--seed", type=int, help="makes sampling reproducible")
    g.add_argument("--speculative", action="store_true",
                   help="MTP self-speculative decoding (same output distribution, fewer main-model forwards)")
    g.add_argument("--compile", action="store_true",
                   help="decode through torch.compile: several times faster per token, after a one-time compile "
                        "(~1 min on 2 cores, 1.5 with --speculative; ~10 s once torch has cached it)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="matmul weights of the engine (default: float32, exact). bfloat16 halves the bytes a token "
                        "reads: with --compile 1.1-1.5x faster per token on a 2-core CPU; eagerly, slower there")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _load(args):
    import torch

    from nanoseek import load
    from nanoseek.cli import pick_device
    from nanoseek.engine import Engine

    model, tokenizer = load(args.path, pick_device(args.device))
    if tokenizer is None:
        raise UserError(f"{args.path} has no tokenizer.json; generate and chat need one next to the model")
    engine = Engine(model, max_batch=1, speculative=args.speculative, compile=args.compile,
                    dtype=getattr(torch, args.dtype))
    if args.compile:
        print("compiling the decode steps (torch.compile) ...", file=sys.stderr, flush=True)
        engine.warm_up(_params(args, ()))  # (the graphs of this sampling only)
    return engine, tokenizer


def _params(args, stop_token_ids, stop_check=None):
    from nanoseek.engine import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, max_new_tokens=args.max_new_tokens,
                          seed=args.seed, stop_token_ids=stop_token_ids, stop_check=stop_check)


class TextStream:
    """Token ids in, new text out, incrementally: each token decodes only the few ids since the last complete
    character (decoded against the ids before them, for decoders whose output depends on context), so a long
    generation costs O(1) per token. Holds back an incomplete UTF-8 character and, with stop strings, the
    characters that could still be the start of one; the text ends before the first stop string."""

    def __init__(self, tokenizer, stops: list[str] = ()):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.hold = max(map(len, self.stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.done = 0  # ids[prefix:done] is context only; ids[done:] is not decoded yet
        self.full = ""  # text of ids[:done], cut at the first stop string
        self.shown = 0
        self.stopped = False

    def text(self) -> str:
        return self.full

    def add(self, token: int) -> str:
        """Append a token; return the text that can be shown now."""
        self.ids.append(token)
        if self.stopped or not self._decode(final=False):
            return ""
        return self._take(self.full if self.stopped else self.full[: max(0, len(self.full) - self.hold)])

    def finish(self) -> str:
        """All the text not shown yet (an incomplete character at the end comes out as U+FFFD)."""
        if not self.stopped:
            self._decode(final=True)
        return self._take(self.full)

    def _decode(self, final: bool) -> bool:
        context = self.tokenizer.decode(self.ids[self.prefix: self.done])
        new = self.tokenizer.decode(self.ids[self.prefix:])[len(context):]
        if not new or (new.endswith("\ufffd") and not final):
            return False
        start = max(0, len(self.full) - self.hold)
        self.full += new
        self.prefix, self.done = self.done, len(self.ids)
        cut = min((i for i in (self.full.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.full, self.stopped = self.full[:cut], True
        return True

    def _take(self, text: str) -> str:
        new = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return new


# --- generate ---------------------------------------------------------------------------------------------

def add_generate_arguments(p) -> None:
    _common_arguments(p, max_new_tokens=128)
    p.add_argument("prompt", nargs="?", help="the prompt text (default: read stdin)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable; TEXT is not part of the output)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _tolerant_stdin() -> None:
    """Bytes on stdin that are not UTF-8 become lone surrogates (as under the C.UTF-8 locale) instead of a
    UnicodeDecodeError, so the tokenizer refuses them with a one-line error."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")


def run_generate(args) -> None:
    prompt = args.prompt
    if prompt is None:
        _tolerant_stdin()
        if sys.stdin.isatty():
            print("(reading the prompt from the terminal: end it with Ctrl-D)", file=sys.stderr)
        prompt = sys.stdin.read()
        if prompt.endswith("\n"):  # echo's and a file's last newline ends the input, it is not part of the prompt
            prompt = prompt[:-1].removesuffix("\r")
    if not prompt.strip():
        raise UserError("empty prompt: give some text (as an argument or on stdin)")
    if any(not s for s in args.stop):
        raise UserError("--stop needs a non-empty text")
    engine, tokenizer = _load(args)
    stop_ids = text_end_ids(tokenizer)
    if args.chat:
        ids, _ = tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        stop_ids = turn_end_ids(tokenizer)
    else:
        ids = tokenizer.encode(prompt, bos=True)
    stops = args.stop
    params = _params(args, stop_ids, tokenizer.stop_check(stops) if stops else None)
    stream = TextStream(tokenizer, stops)
    t0 = time.perf_counter()
    tokens, logprobs, reason = [], [], None
    for ev in engine.stream(ids, params):
        tokens.append(ev.token)
        logprobs.append(ev.logprob)
        reason = ev.finish_reason
        if ev.token in stop_ids:
            continue
        piece = stream.add(ev.token)
        if piece and not args.json:
            print(piece, end="", flush=True)
    seconds = time.perf_counter() - t0
    rest = stream.finish()
    text = stream.text()
    if args.json:
        out = {"prompt": prompt, "text": text, "tokens": tokens, "logprobs": [round(x, 5) for x in logprobs],
               "finish_reason": reason, "prompt_tokens": len(ids), "completion_tokens": len(tokens),
               "seconds": round(seconds, 4), "tokens_per_s": round(len(tokens) / seconds, 1)}
        if args.speculative:
            out["mtp_acceptance"] = round(engine.stats["accepted"] / max(engine.stats["drafted"], 1), 4)
        print(json.dumps(out))
    else:
        print(rest, flush=True)


# --- chat -------------------------------------------------------------------------------------------------

HELP = "commands: /system TEXT (set the system prompt, start over), /reset (start over), /exit"
REPLY_ROOM = 64  # tokens a reply should have room for: the oldest exchanges are dropped to make it


def text_end_ids(tokenizer) -> list[int]:
    """A text ends with <|eos|>, or where another document starts: <|bos|> (the pretraining shards separate
    documents with <|bos|> alone, so a base model ends a text by starting the next one)."""
    return list(dict.fromkeys(t for t in (tokenizer.eos_id, tokenizer.bos_id) if t is not None))


def turn_end_ids(tokenizer) -> list[int]:
    """The assistant's turn ends with <|eos|>; an undertrained model may instead start the next turn (or document)
    itself."""
    from nanoseek.tokenizer import SYSTEM, USER

    return text_end_ids(tokenizer) + [tokenizer.special[t] for t in (USER, SYSTEM) if t in tokenizer.special]


def add_chat_arguments(p) -> None:
    _common_arguments(p, max_new_tokens=256)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="show the <think> part dimmed (auto: on a terminal, unless NO_COLOR is set)")


def dim_reasoning(piece: str) -> str:
    """A piece of a streamed reply with its reasoning dimmed: from <think> to </think> (the terminal keeps the
    attribute across pieces until the reset)."""
    from nanoseek.tokenizer import END_THINK, THINK

    return piece.replace(THINK, DIM + THINK).replace(END_THINK, END_THINK + RESET)


def run_chat(args) -> None:
    engine, tokenizer = _load(args)
    _tolerant_stdin()
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input() (not on Windows)
            import readline  # noqa: F401
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    system, history = args.system, []
    stop_ids = turn_end_ids(tokenizer)
    params = _params(args, stop_ids)
    if interactive:
        print(f"nanoseek chat ({args.path}); {HELP}")

    def show(piece: str) -> None:
        print(dim_reasoning(piece) if color else piece, end="", flush=True)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
            print()
            continue
        except EOFError:
            break
        if (not interactive and not line) or line.strip() in ("/exit", "/quit"):
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        command, _, rest = line.strip().partition(" ")
        if command == "/reset":
            history = []
            print("(conversation reset)")
            continue
        if command == "/system":
            system, history = rest.strip() or None, []
            print("(system prompt set, conversation reset)" if system else "(system prompt cleared)")
            continue
        if command.startswith("//"):  # a message that starts with "/"
            line = line.lstrip()[1:]
        elif command.startswith("/"):
            print(f"unknown command {command}; {HELP}; start a message with // to send a line beginning with /")
            continue
        history.append({"role": "user", "content": line})
        try:
            ids, dropped = _fit(tokenizer, system, history, engine.max_len, params.max_new_tokens)
        except UserError as e:  # e.g. text that is not valid Unicode: this message fails, the chat goes on
            ids, dropped, problem = None, 0, str(e)
        else:
            problem = f"that message alone does not fit the context of {engine.max_len} tokens"
        if ids is None:
            history.pop()
            print(f"error: {problem}", file=sys.stderr)
            continue
        if dropped:
            del history[:dropped]
            print(f"(dropped the {dropped // 2} oldest exchange(s) to fit the context of {engine.max_len} tokens)")
        stream, events = TextStream(tokenizer), engine.stream(ids, params)
        try:
            for ev in events:
                if ev.token in stop_ids:
                    continue
                show(stream.add(ev.token))
            show(stream.finish())
        except KeyboardInterrupt:  # stop this reply (closing the stream frees its slot), keep the conversation
            events.close()
            print(" [interrupted]", end="")
        print(RESET if color else "", flush=True)
        # DeepSeek-R1's practice: earlier turns keep the answer, not the reasoning
        history.append({"role": "assistant", "content": THINK_BLOCK.sub("", stream.text()).strip()})


def _fit(tokenizer, system, history, max_len, max_new_tokens):
    """Render the conversation for generation, dropping the oldest exchanges (user + assistant) until it
    leaves room for a reply of min(REPLY_ROOM, max_new_tokens) tokens (the last message alone needs room for
    one): (ids or None if even the last message is too long, exchanges dropped x 2)."""
    room = min(REPLY_ROOM, max_new_tokens)
    head = [{"role": "system", "content": system}] if system else []
    for dropped in range(0, len(history), 2):
        ids, _ = tokenizer.render_chat(head + history[dropped:], add_generation_prompt=True)
        if len(ids) + room <= max_len or (dropped == len(history) - 1 and len(ids) < max_len):
            return ids, dropped
    return None, 0
