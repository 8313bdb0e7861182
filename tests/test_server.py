"""`nanoseek serve`: the official openai client against a live server on 127.0.0.1 (a free port), errors,
concurrency, disconnects and the queue limit. A tiny random model: outputs are checked against the engine."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest

from nanoseek.chat import turn_end_ids
from nanoseek.engine import Engine, Event, SamplingParams
from nanoseek.server import ChoiceText, EngineLoop, Server, serving, split_reasoning
from nanoseek.tokenizer import END_THINK, THINK


@pytest.fixture(scope="module")
def url(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with serving(Server(model, tok, "tiny", max_batch=8)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def engine_greedy(model, ids, stop_ids, n):
    out = Engine(model).generate([ids], SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=stop_ids))[0]
    return out


def chat(client, content, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def test_models_health_and_metrics(client, url):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    assert httpx.get(url + "/health").json() == {"status": "ok", "model": "tiny", "auth": False}
    m = httpx.get(url + "/metrics").json()
    assert {"requests_total", "tokens_per_s", "queue_depth", "running_batch"} <= m.keys()


def test_tokens_per_second_is_that_of_the_last_ten_seconds():
    loop = SimpleNamespace(recent=[], stats={"started": time.time() - 100})
    rate = lambda: EngineLoop.tokens_per_s(loop)  # noqa: E731
    assert rate() == 0
    loop.recent = [(time.time() - 1, 50), (time.time() - 0.5, 50)]
    assert rate() == pytest.approx(10, rel=0.01)  # 100 tokens over the 10 s window, not over 0.5 s
    loop.recent = [(time.time() - 30, 500)]
    assert rate() == 0  # idle for 30 s: nothing recent


def test_chat_is_greedy_engine_output(client, model_and_tokenizer):
    model, tok = model_and_tokenizer
    r = chat(client, "Good night my lord", temperature=0, max_tokens=12)
    ids, _ = tok.render_chat([{"role": "user", "content": "Good night my lord"}], add_generation_prompt=True)
    stop_ids = turn_end_ids(tok)
    ref = engine_greedy(model, ids, stop_ids, 12)
    text = tok.decode([t for t in ref.tokens if t not in stop_ids])
    assert r.choices[0].message.content == split_reasoning(text)[1]
    assert r.choices[0].message.reasoning_content == split_reasoning(text)[0]  # None (null) without a <think> part
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.tokens)
    assert r.usage.total_tokens == len(ids) + len(ref.tokens)


def test_stream_equals_non_stream_and_reports_usage(client):
    full = chat(client, "the queen said", temperature=0, max_tokens=16)
    chunks = list(chat(client, "the queen said", temperature=0, max_tokens=16, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
           [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_penalties_reach_the_engine(client, model_and_tokenizer):
    """presence_penalty and frequency_penalty (OpenAI) and repetition_penalty (vLLM's extra) steer the tokens as
    the engine does with them."""
    model, tok = model_and_tokenizer
    ids = tok.encode("The king", bos=True)
    for penalties in ({"frequency_penalty": -1.0}, {"presence_penalty": -1.0, "repetition_penalty": 0.7}):
        repetition = penalties.pop("repetition_penalty", 1.0)
        r = client.completions.create(model="tiny", prompt="The king", max_tokens=10, temperature=0,
                                      extra_body={"repetition_penalty": repetition}, **penalties)
        ref = Engine(model).generate([ids], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[
            tok.eos_id], repetition_penalty=repetition, **penalties))[0]
        assert ref.tokens != engine_greedy(model, ids, [tok.eos_id], 10).tokens  # (the penalty matters here)
        assert r.choices[0].text == tok.decode([t for t in ref.tokens if t != tok.eos_id])


def test_sampling_fields_and_length_defaults_reach_the_engine(model_and_tokenizer):
    """What each request field becomes in the engine's SamplingParams (no generation)."""
    from nanoseek.server import _schemas

    model, tok = model_and_tokenizer
    ChatRequest, CompletionRequest = _schemas()
    server = Server(model, tok, "tiny", max_batch=2)
    try:
        hi = [{"role": "user", "content": "hi"}]
        (ids, p), = server.chat_jobs(ChatRequest(messages=hi, temperature=0.7, top_p=0.8, top_k=5, seed=3,
                                                 presence_penalty=0.5, frequency_penalty=0.25,
                                                 repetition_penalty=1.1, max_completion_tokens=9)).jobs
        assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_new_tokens) == (0.7, 0.8, 5, 3, 9)
        assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, 0.25, 1.1)
        (ids, p), = server.chat_jobs(ChatRequest(messages=hi)).jobs  # chat: what the context leaves
        assert p.max_new_tokens == server.engine.max_len - len(ids)
        (_, p), = server.completion_jobs(CompletionRequest(prompt="hi")).jobs  # completions: 16
        assert p.max_new_tokens == 16
        (_, p), = server.completion_jobs(CompletionRequest(prompt="hi", max_tokens=5)).jobs
        assert p.max_new_tokens == 5
    finally:
        server.close()


def test_completions_n_seed_and_stop(client, model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert client.completions.create(model="tiny", prompt="The king").usage.completion_tokens <= 16  # OpenAI's default
    r = client.completions.create(model="tiny", prompt="The king", max_tokens=10, temperature=0)
    ref = engine_greedy(model, tok.encode("The king", bos=True), [tok.eos_id], 10)
    assert r.choices[0].text == tok.decode([t for t in ref.tokens if t != tok.eos_id])
    a = client.completions.create(model="tiny", prompt="The king", max_tokens=10, temperature=1.0, seed=7, n=3)
    b = client.completions.create(model="tiny", prompt="The king", max_tokens=10, temperature=1.0, seed=7, n=3)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3
    assert len({c.text for c in a.choices}) > 1  # each choice draws with its own seed
    # a stop string taken from the greedy text: the output ends right before it
    greedy = r.choices[0].text
    stop = greedy[3:5]
    s = client.completions.create(model="tiny", prompt="The king", max_tokens=10, temperature=0, stop=[stop])
    assert s.choices[0].text == greedy[: greedy.index(stop)] and s.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="The king", max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == greedy


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"messages": "hello"}', 400, "messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', 400, "n"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "messages.0.role"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000000}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": ["", "a"]}', 400, "stop"),
    (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
    (b'{"messages": [{"role": "user", "content": "x"}], "seed": 18446744073709551616}', 400, None),
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": 3}', 400, "logprobs"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', 400, "top_logprobs"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}', 400, "top_logprobs"),
    (b'{"messages": [{"role": "user", "content": "x"}], "echo": true}', 400, "echo"),
    (b'{"messages": [{"role": "user", "content": "x"}], "best_of": 2}', 400, "best_of"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": "a\\ud800"}', 400, "stop"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": 5}', 400, "stop"),  # (not "stop.str")
    (b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}', 400,
     "stream_options"),
    (b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}', 400,
     "response_format"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', 400, "tools"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 10}}', 400, "logit_bias"),
    (b'{"messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5}', 400, "presence_penalty"),
    (b'{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}', 400, "repetition_penalty"),
    pytest.param(b'{"messages": ' + b'[' * 100_000 + b']' * 100_000 + b'}', 400, None, id="nested-too-deep"),
])
def test_bad_requests_get_openai_errors(url, body, status, param):
    r = httpx.post(url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert "Traceback" not in r.text


def test_surrogates_seeds_null_fields_and_unsupported_fields(url):
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "\\ud800"}',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 2, "seed": -(2**63)})
    assert r.status_code == 200
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None}  # nullable in OpenAI's API: defaults
    r = httpx.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 2, **nulls})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1
    for bad in ({"logprobs": 21}, {"logprobs": True}, {"top_logprobs": 2}, {"prompt": [1, 10**6]}):
        r = httpx.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 2, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad)), r.text
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                                       "logprobs": False, "top_logprobs": 0, "best_of": 1,
                                                       "response_format": {"type": "text"}, "logit_bias": {},
                                                       "tools": [], "presence_penalty": None})
    assert r.status_code == 200
    r = httpx.post(url + "/v1/completions", json={"prompt": "The", "suffix": "end"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


def test_chat_logprobs_are_the_engines_streamed_or_not(client, model_and_tokenizer):
    model, tok = model_and_tokenizer
    r = chat(client, "Good night my lord", temperature=0, max_tokens=10, logprobs=True, top_logprobs=2)
    ids, _ = tok.render_chat([{"role": "user", "content": "Good night my lord"}], add_generation_prompt=True)
    stop_ids = turn_end_ids(tok)
    ref = engine_greedy(model, ids, stop_ids, 10)
    kept = [(t, lp) for t, lp in zip(ref.tokens, ref.logprobs) if t not in stop_ids]  # turn ends are not text
    content = r.choices[0].logprobs.content
    assert [bytes(c.bytes) for c in content] == [tok.token_bytes(t) for t, _ in kept]
    assert [c.logprob for c in content] == pytest.approx([lp for _, lp in kept], abs=1e-4)
    for c in content:  # greedy: the chosen token is the most likely one
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob) and c.top_logprobs[1].logprob <= c.logprob
    chunks = list(chat(client, "Good night my lord", temperature=0, max_tokens=10, logprobs=True, top_logprobs=2,
                       stream=True))
    streamed = [c for ch in chunks[1:] for c in ch.choices[0].logprobs.content]
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in content]
    assert chat(client, "Good night my lord", max_tokens=2).choices[0].logprobs is None


def test_completions_echo_scores_the_prompt_like_lm_eval_asks(client, model_and_tokenizer):
    """echo + logprobs: the prompt's tokens come first, each scored given the ones before it (the first one too,
    given the BOS the server adds to a text prompt; a prompt of token ids is taken as it is)."""
    import torch

    model, tok = model_and_tokenizer
    r = client.completions.create(model="tiny", prompt="The king", max_tokens=3, temperature=0, logprobs=2, echo=True)
    ids = tok.encode("The king", bos=True)
    ref = engine_greedy(model, ids, [tok.eos_id], 3)
    choice = r.choices[0]
    assert choice.text == "The king" + tok.decode([t for t in ref.tokens if t != tok.eos_id])
    lp = choice.logprobs
    with torch.no_grad():
        logp = model(torch.tensor([ids + ref.tokens])).log_softmax(-1)[0, :-1]
    targets = ids[1:] + ref.tokens  # every generated token, an end-of-sequence too
    expected = logp[torch.arange(len(targets)), torch.tensor(targets)].tolist()
    assert lp.tokens == [tok.token_bytes(t).decode(errors="replace") for t in targets]
    assert "".join(lp.tokens[: len(ids) - 1]) == "The king"  # (a random model's tokens may split a character)
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert lp.text_offset[: len(ids)] == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    # the 2 most likely and the chosen token (tokens that read the same, e.g. ids of a random model outside the
    # tokenizer, "", share one key)
    assert all(1 <= len(top) <= 3 and max(top.values()) >= x for top, x in zip(lp.top_logprobs, lp.token_logprobs))
    # token ids as the prompt: no BOS is added, so the first token has nothing to be scored against
    by_ids = client.completions.create(model="tiny", prompt=ids[1:], max_tokens=1, temperature=0, logprobs=1,
                                       echo=True)
    assert by_ids.choices[0].logprobs.token_logprobs[0] is None
    assert by_ids.choices[0].logprobs.tokens[:2] == lp.tokens[:2] and by_ids.usage.prompt_tokens == len(ids) - 1
    streamed = list(client.completions.create(model="tiny", prompt="The king", max_tokens=3, temperature=0,
                                              logprobs=2, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert [t for c in streamed for t in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert [o for c in streamed for o in c.choices[0].logprobs.text_offset] == lp.text_offset
    echoed = client.completions.create(model="tiny", prompt="The king", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == choice.text and echoed.choices[0].logprobs is None


def test_logprob_entries_of_stop_tokens_and_split_characters(model_and_tokenizer):
    """Completions list every generated token (lm-evaluation-harness reads the entries before the last generated
    one as the continuation's), chat leaves its turn end out; text_offset counts characters, and a character split
    over several byte-level tokens starts at the first of them."""
    _, tok = model_and_tokenizer
    text = "a🙂é b"
    ids = tok.encode(text) + [tok.eos_id]
    assert len(ids) > len(text) + 1  # the tiny tokenizer splits the emoji's bytes
    for chat in (True, False):  # (the completions' entries are checked further below)
        choice = ChoiceText(tok, [], [tok.eos_id], chat=chat, logprobs=True)
        for i, t in enumerate(ids):
            choice.add(Event(0, t, -1.0, "stop" if i == len(ids) - 1 else None, [(t, -1.0)]))
        entries = choice.new_logprobs()
        assert [t for t, _, _ in entries] == (ids[:-1] if chat else ids) and choice.full()[1] == text
    starts = [len(tok.token_bytes(t)) for t in ids]
    starts = [sum(starts[:i]) for i in range(len(ids))]
    raw = b"".join(tok.token_bytes(t) for t in ids)
    assert choice.completion_logprobs(entries)["text_offset"] == [len(raw[:b].decode(errors="ignore")) for b in starts]


def test_stop_strings_of_multi_byte_characters_are_seen(model_and_tokenizer):

    model, tok = model_and_tokenizer
    server = Server(model, tok, "tiny", max_batch=1)
    try:
        req = SimpleNamespace(max_completion_tokens=None, max_tokens=8, temperature=0, top_k=0, top_p=1, seed=None,
                              presence_penalty=0, frequency_penalty=0, repetition_penalty=1)
        stop = "🙂🙂🙂"
        params = server._params(req, 4, [], [stop], 0)
        generated = tok.encode("a few words " + stop)
        assert len(tok.encode(stop)) > len(stop) + 8 and params.stop_check(generated)
    finally:
        server.close()


def test_over_long_prompt_huge_body_and_unknown_route(client, url):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "the king said " * 200)
    assert e.value.body["code"] == "context_length_exceeded"
    r = httpx.post(url + "/v1/completions", content=b"x" * (2 << 20))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # a chunked body (no Content-Length) is refused as it arrives: here it never ends, and the 413 comes anyway
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(2):
            sock.sendall(b"100000\r\n" + b"x" * (1 << 20) + b"\r\n")
        assert sock.recv(4096).split(b"\r\n")[0] == b"HTTP/1.1 413 Request Entity Too Large"
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_api_key(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with serving(Server(model, tok, "tiny", api_key="sekret", max_batch=2)) as u:
        assert httpx.get(u + "/health").json()["auth"] is True  # the page learns it must ask for a key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=u + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(u + "/v1/models").status_code == 401
        ok = openai.OpenAI(base_url=u + "/v1", api_key="sekret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="The", max_tokens=2).usage.completion_tokens >= 1


def test_an_ipv6_address_is_served_at_a_bracketed_url(model_and_tokenizer):
    model, tok = model_and_tokenizer
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with serving(Server(model, tok, "tiny", max_batch=1), host="::1") as u:
        assert u.startswith("http://[::1]:") and httpx.get(u + "/health").status_code == 200


def test_sixteen_concurrent_clients_match_sequential_greedy(client):
    prompts = [f"the {w} said" for w in "king queen lord men women war peace sword crown heart day night love "
               "death good come".split()]
    assert len(prompts) == 16
    ask = lambda p: chat(client, p, temperature=0, max_tokens=12).choices[0].message.content
    sequential = [ask(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(ask, prompts))
    assert concurrent == sequential


def wait_idle(url, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = httpx.get(url + "/metrics").json()
        if m["sequences_outstanding"] == 0 and m["running_batch"] == 0 and m["queue_depth"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"server still busy: {m}")


@pytest.fixture(scope="module")
def long_request(model_and_tokenizer):
    """A streaming completion that runs 240 greedy tokens (no early end-of-sequence), so it is still running
    when the test acts."""
    model, tok = model_and_tokenizer
    for prompt in ("The king", "The queen", "My lord", "Good night", "Peace", "War"):
        if engine_greedy(model, tok.encode(prompt, bos=True), [tok.eos_id], 240).finish_reason == "length":
            return {"prompt": prompt, "max_tokens": 240, "temperature": 0, "stream": True}
    pytest.fail("every prompt ends early")


def test_disconnect_mid_stream_frees_the_slot(model_and_tokenizer, long_request):
    model, tok = model_and_tokenizer
    server = Server(model, tok, "tiny", max_batch=2)
    with serving(server) as u:
        body = long_request
        with httpx.stream("POST", u + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # generation is running
        m = wait_idle(u)
        assert m["completion_tokens_total"] < 240  # stopped early
        engine = server.engine
        assert sorted(engine.cache.free_slots) == [0, 1] and not engine.running and not engine.sequences
        # the server still works afterwards
        assert httpx.post(u + "/v1/completions", json={"prompt": "The", "max_tokens": 3}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_failure_fails_its_requests_and_the_server_goes_on(model_and_tokenizer, stream):
    """A forward that raises (say, out of memory) in the engine thread: that request gets a 500 (or an error event
    in its stream), its sequences are released, and the next request is served."""
    model, tok = model_and_tokenizer
    server = Server(model, tok, "tiny", max_batch=2, max_queue=0)
    hidden, failed = server.engine.forward.hidden, []

    def fails_once(*args):
        if not failed:
            failed.append(True)
            raise MemoryError("out of memory")
        return hidden(*args)
    server.engine.forward.hidden = fails_once
    with serving(server) as u:
        body = {"prompt": "The", "max_tokens": 3, "stream": stream}
        r = httpx.post(u + "/v1/completions", json=body)
        if stream:
            assert r.status_code == 200 and '"the engine failed: MemoryError: out of memory"' in r.text
        else:
            assert r.status_code == 500 and "out of memory" in r.json()["error"]["message"]
        assert wait_idle(u)["sequences_outstanding"] == 0 and sorted(server.engine.cache.free_slots) == [0, 1]
        assert httpx.post(u + "/v1/completions", json={**body, "stream": False}).status_code == 200


def test_a_non_streaming_client_that_leaves_frees_its_slots(model_and_tokenizer, long_request):
    model, tok = model_and_tokenizer
    server = Server(model, tok, "tiny", max_batch=2, max_queue=0)
    step = server.engine.step
    server.engine.step = lambda: (time.sleep(0.02), step())[1]  # 240 tokens take ~5 s
    with serving(server) as u:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(u + "/v1/completions", json={**long_request, "stream": False}, timeout=0.5)
        m = wait_idle(u, timeout=3)
        assert m["completion_tokens_total"] < 240 and sorted(server.engine.cache.free_slots) == [0, 1]
        # more sequences than the server can ever hold: not a 429 to retry
        r = httpx.post(u + "/v1/completions", json={"prompt": "The", "max_tokens": 2, "n": 3})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences"


def test_full_queue_answers_429(model_and_tokenizer):
    model, tok = model_and_tokenizer
    server = Server(model, tok, "tiny", max_batch=1, max_queue=1)
    gate, step = threading.Event(), server.engine.step
    server.engine.step = lambda: (gate.wait(), step())[1]  # hold the engine so that requests pile up
    body = {"prompt": "The", "max_tokens": 3}
    with serving(server) as u, ThreadPoolExecutor(2) as pool:
        first = [pool.submit(httpx.post, u + "/v1/completions", json=body, timeout=30) for _ in range(2)]
        while httpx.get(u + "/metrics").json()["sequences_outstanding"] < 2:
            time.sleep(0.01)
        third = httpx.post(u + "/v1/completions", json=body)
        assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
        gate.set()
        assert [f.result().status_code for f in first] == [200, 200]
        wait_idle(u)
        assert httpx.post(u + "/v1/completions", json=body).status_code == 200


def test_reasoning_is_split_from_content(model_and_tokenizer):
    _, tok = model_and_tokenizer
    assert split_reasoning(f"{THINK}\n2+2 is 4\n{END_THINK}\n\nIt is 4.") == ("2+2 is 4", "It is 4.")
    assert split_reasoning(f"{THINK}still thinking") == ("still thinking", "")
    assert split_reasoning("no reasoning here") == (None, "no reasoning here")
    # streamed token by token, the deltas add up to the same split
    reply = f" {THINK}the king has 3 men{END_THINK} So 3 men."
    ids = tok.encode(reply) + [tok.eos_id]
    text = ChoiceText(tok, [], [tok.eos_id], chat=True)
    parts = [text.add(Event(0, t, 0.0, "stop" if i == len(ids) - 1 else None)) for i, t in enumerate(ids)]
    reasoning, content = "".join(p[0] for p in parts), "".join(p[1] for p in parts)
    assert (reasoning, content) == ("the king has 3 men", "So 3 men.") == text.full()
    assert all(THINK not in c and END_THINK not in c for _, c in parts)


def test_serve_cli_bad_path_and_port(tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_serve_cli_starts_and_answers(tmp_path, model_and_tokenizer):
    """The real command in a subprocess: prints its URL, answers, stops on SIGTERM."""
    import signal
    import subprocess
    import sys

    from nanoseek.checkpoint import save_model

    model, tok = model_and_tokenizer
    save_model(model, tmp_path / "run" / "base")
    tok.save(tmp_path / "run" / "tokenizer")
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", str(tmp_path / "run"), "--port", "0",
                             "--no-compile"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving 'run'" in line, line + proc.stderr.read()
        base = line.split(" on ")[1].split()[0]
        r = httpx.post(base + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == "run"
        assert "<html" in httpx.get(base + "/").text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert "Traceback" not in proc.stderr.read()


def test_requests_from_many_threads_share_one_batch(url):
    """While 8 streams run, the engine's running batch holds several of them at once."""
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(httpx.get(url + "/metrics").json()["running_batch"])
            time.sleep(0.01)

    body = {"prompt": "The king", "max_tokens": 60, "temperature": 1.0}
    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: httpx.post(url + "/v1/completions", json=body, timeout=60), range(8)))
    stop.set()
    watcher.join()
    assert all(r.status_code == 200 for r in results)
    assert max(seen) >= 4, seen
    assert json.loads(results[0].text)["usage"]["completion_tokens"] >= 1


def test_serve_defaults_reach_the_server(tmp_path, model_and_tokenizer, monkeypatch):
    """What `nanoseek serve RUN` builds by default: an MLA model decodes compiled with bfloat16 weights, the dense
    MHA baseline eagerly; the API key comes from $NANOSEEK_API_KEY."""
    import torch

    import nanoseek.server as srv
    from nanoseek.checkpoint import save_model
    from nanoseek.cli import build_parser
    from nanoseek.config import preset
    from nanoseek.model import NanoSeek

    model, tok = model_and_tokenizer
    dense = NanoSeek(preset("dense", vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64))
    for name, m in (("mla", model), ("dense", dense)):
        save_model(m, tmp_path / name / "base")
        tok.save(tmp_path / name / "tokenizer")
    built = []
    monkeypatch.setattr(srv, "Server", lambda *args, **kw: built.append(kw))
    monkeypatch.setenv("NANOSEEK_API_KEY", "sekret")
    for name in ("mla", "dense"):
        srv.build_server(build_parser().parse_args(["serve", str(tmp_path / name), "--port", "0"]))
    assert built[0]["engine_kwargs"] == {"speculative": False, "dtype": torch.bfloat16, "compile": True}
    assert built[0]["api_key"] == "sekret" and built[0]["max_batch"] == 32
    assert built[1]["engine_kwargs"]["compile"] is False


def test_a_compiled_engine_serves_the_same_answers_to_concurrent_clients(model_and_tokenizer, compiler):
    """serve's default: decode graphs compiled before listening, then driven from the engine thread at batch
    sizes 1..4 as requests come and go."""
    model, tok = model_and_tokenizer
    server = Server(model, tok, "tiny", max_batch=4, engine_kwargs={"compile": True})
    with serving(server) as u:
        client = openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0)
        prompts = ["Good night my lord", "the queen said", "What is 3 + 4?", "Tell me a story", "hello"]
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda p: chat(client, p, temperature=0, max_tokens=12), prompts))
    stop_ids = turn_end_ids(tok)
    for p, r in zip(prompts, answers):
        ids, _ = tok.render_chat([{"role": "user", "content": p}], add_generation_prompt=True)
        ref = engine_greedy(model, ids, stop_ids, 12)
        assert r.choices[0].message.content == split_reasoning(tok.decode([t for t in ref.tokens
                                                                            if t not in stop_ids]))[1]
    assert server.engine.forward.compiled is not None  # (a failed compile would have decoded eagerly)
