"""`nanoseek generate` and `nanoseek chat` on a tiny model saved in tmp_path with a tokenizer trained here."""

import copy
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import corpus_text
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.chat import DIM, HELP, RESET, THINK_BLOCK, TextStream, _fit, dim_reasoning
from nanoseek.checkpoint import save_model
from nanoseek.cli import main
from nanoseek.config import preset
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import NanoSeek
from nanoseek.tokenizer import SYSTEM, USER, train_tokenizer

MAX_NEW = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = train_tokenizer(iter([corpus_text()]), vocab_size=512)
    model = NanoSeek(preset("tiny", vocab_size=512)).eval()
    d = tmp_path_factory.mktemp("run")
    save_model(model, d / "base")
    tok.save(d / "tokenizer")
    return d, model, tok


def greedy(model, ids, stop_ids):
    out = Engine(model).generate([ids], SamplingParams(temperature=0, max_new_tokens=MAX_NEW,
                                                       stop_token_ids=stop_ids))[0]
    return [t for t in out.tokens if t not in stop_ids]


def generate(capsys, *args):
    code = main(["generate", *map(str, args), "--temperature", "0", "--max-new-tokens", str(MAX_NEW)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_generate_json_is_greedy_decoding(run_dir, capsys):
    d, model, tok = run_dir
    res = json.loads(generate(capsys, d, "The king said", "--json").strip().splitlines()[-1])
    ids = tok.encode("The king said", bos=True)
    expected = greedy(model, ids, [tok.eos_id])
    assert [t for t in res["tokens"] if t != tok.eos_id] == expected
    assert res["text"] == tok.decode(expected) and res["prompt_tokens"] == len(ids)
    assert res["finish_reason"] in ("stop", "length") and len(res["logprobs"]) == len(res["tokens"])
    assert all(lp <= 0 for lp in res["logprobs"])


def engines_made(monkeypatch) -> list:
    """The Engine objects the CLI makes from now on."""
    import nanoseek.engine

    made, real = [], nanoseek.engine.Engine
    monkeypatch.setattr(nanoseek.engine, "Engine", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    return made


def test_a_text_ends_where_the_next_document_starts(run_dir, capsys, tmp_path, monkeypatch):
    """Pretraining separates documents with <|bos|> alone: a base model ends a text by starting another, so
    generate, chat and the server stop there rather than print "<|bos|>" and run on into a new document."""
    _, model, tok = run_dir
    ends = copy.deepcopy(model)
    with torch.no_grad():
        ends.model.norm.weight.zero_()  # every logit 0: the greedy choice is id 0, <|bos|>
    assert tok.bos_id == 0
    save_model(ends, tmp_path / "base")
    tok.save(tmp_path / "tokenizer")
    res = json.loads(generate(capsys, tmp_path, "The king said", "--json").strip().splitlines()[-1])
    assert res["tokens"] == [tok.bos_id] and res["text"] == "" and res["finish_reason"] == "stop"
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", str(tmp_path), "--temperature", "0", "--max-new-tokens", str(MAX_NEW)]) == 0
    assert capsys.readouterr().out == "\n"  # an empty reply


def test_a_prompt_on_stdin_loses_its_last_newline(run_dir, capsys, monkeypatch):
    d, _, _ = run_dir
    as_argument = json.loads(generate(capsys, d, "The king said", "--json").splitlines()[-1])
    for piped in ("The king said\n", "The king said\r\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
        res = json.loads(generate(capsys, d, "--json").splitlines()[-1])
        assert res["prompt"] == "The king said" and res["tokens"] == as_argument["tokens"]


def test_generate_compile_gives_the_same_tokens(run_dir, capsys, monkeypatch, compiler):
    d, _, _ = run_dir
    eager = json.loads(generate(capsys, d, "The king said", "--json").strip().splitlines()[-1])
    made = engines_made(monkeypatch)
    compiled = json.loads(generate(capsys, d, "The king said", "--json", "--compile").strip().splitlines()[-1])
    assert compiled["tokens"] == eager["tokens"]
    assert made[0].forward.compiled is not None  # it decoded compiled (a failed compile falls back to eager)


def test_generate_dtype_picks_the_engine_weights(run_dir, capsys, monkeypatch):
    d, _, _ = run_dir
    made = engines_made(monkeypatch)
    for dtype in ([], ["--dtype", "bfloat16"]):
        assert json.loads(generate(capsys, d, "The king said", "--json", *dtype))["tokens"]
    assert [e.dtype for e in made] == [torch.float32, torch.bfloat16]


def test_generate_chat_wraps_the_prompt_in_the_template(run_dir, capsys):
    d, model, tok = run_dir
    res = json.loads(generate(capsys, d, "who are you", "--json", "--chat"))
    ids, _ = tok.render_chat([{"role": "user", "content": "who are you"}], add_generation_prompt=True)
    stop = [tok.eos_id, tok.special[USER], tok.special[SYSTEM]]
    assert res["prompt_tokens"] == len(ids) and res["text"] == tok.decode(greedy(model, ids, stop))


def test_streamed_text_and_stop_strings(run_dir, capsys):
    d, _, _ = run_dir
    full = json.loads(generate(capsys, d, "Good night", "--json"))["text"]
    assert generate(capsys, d, "Good night") == full + "\n"  # streaming prints exactly the same text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full  # the random model must have produced some text
    res = json.loads(generate(capsys, d, "Good night", "--json", "--stop", stop))
    assert res["text"] == full[: full.index(stop)] and res["finish_reason"] == "stop"
    # streaming holds back what could still become the stop string, so it never shows any of it
    assert generate(capsys, d, "Good night", "--stop", stop) == full[: full.index(stop)] + "\n"


def test_generate_from_an_exported_transformers_directory(run_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from nanoseek.hf import export

    d, model, _ = run_dir
    export(model, tmp_path / "hf", d / "tokenizer")
    made = engines_made(monkeypatch)
    a = json.loads(generate(capsys, d, "Speak", "--json", "--speculative"))
    b = json.loads(generate(capsys, tmp_path / "hf", "Speak", "--json"))
    assert a["tokens"] == b["tokens"]
    drafted = made[0].stats["drafted"]  # the first run drafted with the MTP module
    assert drafted > 0 and a["mtp_acceptance"] == round(made[0].stats["accepted"] / drafted, 4)


def test_chat_commands_and_history(run_dir, capsys, monkeypatch):
    d, model, tok = run_dir
    lines = ["hello there", "/system Be brief.", "who are you", "and then?", "/reset", "/usr is a directory",
             "//who are you", "/exit", "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", str(d), "--temperature", "0", "--max-new-tokens", str(MAX_NEW)]) == 0
    out = capsys.readouterr().out
    stop = [tok.eos_id, tok.special[USER], tok.special[SYSTEM]]

    def reply(messages):
        return tok.decode(greedy(model, tok.render_chat(messages, add_generation_prompt=True)[0], stop))

    sys_msg = {"role": "system", "content": "Be brief."}
    r1 = reply([{"role": "user", "content": "hello there"}])
    r2 = reply([sys_msg, {"role": "user", "content": "who are you"}])
    r3 = reply([sys_msg, {"role": "user", "content": "who are you"},
                {"role": "assistant", "content": THINK_BLOCK.sub("", r2).strip()},
                {"role": "user", "content": "and then?"}])
    r4 = reply([sys_msg, {"role": "user", "content": "/who are you"}])
    unknown = f"unknown command /usr; {HELP}; start a message with // to send a line beginning with /"
    assert out == f"{r1}\n(system prompt set, conversation reset)\n{r2}\n{r3}\n(conversation reset)\n{unknown}\n{r4}\n"


def in_terminal(*args: str, typed: bytes) -> tuple[int, str]:
    """Run `nanoseek args` in a pseudo-terminal (stdin, stdout and stderr), as a user in a shell does, with `typed`
    at the keyboard -> (exit code, everything the terminal showed, its line ends as newlines)."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", *args], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    os.write(master, typed)
    shown = b""
    try:
        while select.select([master], [], [], 120)[0]:
            chunk = os.read(master, 4096)
            if not chunk:
                break
            shown += chunk
    except OSError:  # (Linux: the program exited and closed the terminal)
        pass
    finally:
        os.close(master)
    return proc.wait(timeout=60), shown.decode(errors="replace").replace("\r\n", "\n")


def test_chat_and_generate_in_a_terminal(run_dir):
    """The interactive paths: chat's banner and prompt, line editing's input(), colour on by itself (auto); generate
    without a prompt reads the terminal until Ctrl-D, says so, and takes the typed line without its newline."""
    d, model, tok = run_dir
    code, shown = in_terminal("chat", str(d), "--temperature", "0", "--max-new-tokens", str(MAX_NEW),
                              typed=b"hello there\n/reset\n/exit\n")
    assert code == 0, shown
    stop = [tok.eos_id, tok.special[USER], tok.special[SYSTEM]]
    reply = tok.decode(greedy(model, tok.render_chat([{"role": "user", "content": "hello there"}],
                                                     add_generation_prompt=True)[0], stop))
    assert f"nanoseek chat ({d}); {HELP}" in shown and "> " in shown
    assert f"{reply}{RESET}\n" in shown and "(conversation reset)" in shown and "Traceback" not in shown
    code, shown = in_terminal("generate", str(d), "--temperature", "0", "--max-new-tokens", str(MAX_NEW),
                              typed=b"The king said\n\x04")
    assert code == 0, shown
    assert "(reading the prompt from the terminal: end it with Ctrl-D)" in shown
    assert shown.endswith(tok.decode(greedy(model, tok.encode("The king said", bos=True), [tok.eos_id, tok.bos_id]))
                          + "\n")


def test_reasoning_is_dimmed_when_colour_is_on(run_dir, capsys, monkeypatch):
    assert dim_reasoning("a<think>b") + dim_reasoning("c</think>d") == f"a{DIM}<think>bc</think>{RESET}d"
    d, _, _ = run_dir
    for color, coded in (("always", True), ("never", False), ("auto", False)):  # (auto: stdout is not a terminal)
        monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
        assert main(["chat", str(d), "--temperature", "0", "--max-new-tokens", "4", "--color", color]) == 0
        assert (RESET in capsys.readouterr().out) == coded


def test_chat_drops_old_exchanges_when_the_context_is_full(run_dir, capsys, monkeypatch):
    d, _, _ = run_dir
    long = " ".join(["the king said good night"] * 15)  # 76 tokens: 4 of them overflow the context of 256
    huge = " ".join(["the king said good night"] * 60)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long}\n" * 4 + f"{huge}\nhi\n"))
    assert main(["chat", str(d), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "(dropped the 1 oldest exchange(s) to fit the context of 256 tokens)" in out
    assert err.strip() == "error: that message alone does not fit the context of 256 tokens"


def test_chat_goes_on_after_a_message_it_cannot_take(run_dir, capsys, monkeypatch):
    """A line that is not valid Unicode (bytes that are not UTF-8 arrive as lone surrogates) fails alone."""
    d, model, tok = run_dir
    monkeypatch.setattr(sys, "stdin", io.StringIO("caf\udce9\nhello there\n"))
    assert main(["chat", str(d), "--temperature", "0", "--max-new-tokens", str(MAX_NEW)]) == 0
    out, err = capsys.readouterr()
    assert err.strip() == "error: the text is not valid Unicode (it holds a lone surrogate)"
    stop = [tok.eos_id, tok.special[USER], tok.special[SYSTEM]]
    ids = tok.render_chat([{"role": "user", "content": "hello there"}], add_generation_prompt=True)[0]
    assert out == tok.decode(greedy(model, ids, stop)) + "\n"


def test_chat_keeps_room_for_a_reply(run_dir):
    """Old exchanges are dropped until the reply has room (not only one token); the last message alone may
    leave less."""
    _, _, tok = run_dir
    exchange = [{"role": "user", "content": "the king " * 30}, {"role": "assistant", "content": "good night " * 30}]
    history = exchange * 2 + [{"role": "user", "content": "hi"}]
    full = len(tok.render_chat(history, add_generation_prompt=True)[0])
    ids, dropped = _fit(tok, None, history, full + 10, max_new_tokens=10)
    assert dropped == 0 and len(ids) == full
    ids, dropped = _fit(tok, None, history, full + 9, max_new_tokens=10)
    assert dropped == 2 and len(ids) + 10 <= full + 9
    last = len(tok.render_chat(history[-1:], add_generation_prompt=True)[0])
    assert _fit(tok, None, history, last + 1, max_new_tokens=10) == (tok.render_chat(history[-1:], True)[0], 4)
    assert _fit(tok, None, history, last, max_new_tokens=10) == (None, 0)
    # a reply may be longer than the room kept for it: 256 new tokens asked, 64 kept (REPLY_ROOM), so that a
    # long --max-new-tokens does not drop the whole conversation at every turn
    assert _fit(tok, None, history, full + 64, max_new_tokens=256) == (tok.render_chat(history, True)[0], 0)
    assert _fit(tok, None, history, full + 63, max_new_tokens=256)[1] == 2


def test_generate_refuses_stdin_that_is_not_utf8(run_dir):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # strict decoding, as under en_US.UTF-8
    r = subprocess.run([sys.executable, "-m", "nanoseek", "generate", str(run_dir[0])], input=b"caf\xe9\n",
                       capture_output=True, env=env, timeout=120)
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    assert r.stderr.decode().strip() == ("nanoseek generate: error: the text is not valid Unicode (it holds a "
                                         "lone surrogate)")


def one_line_error(capsys, *args):
    assert main(list(map(str, args))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nanoseek {args[0]}: error:"), err
    return err


@pytest.mark.parametrize("flags,match", [
    (["--temperature", "-1"], "temperature"), (["--top-p", "2"], "top_p"), (["--top-k", "-3"], "top_k"),
    (["--max-new-tokens", "0"], "max_new_tokens"), (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--presence-penalty", "3"], "presence_penalty"),
])
def test_invalid_sampling_flags_are_one_line_errors(run_dir, capsys, flags, match):
    assert match in one_line_error(capsys, "generate", run_dir[0], "hi", *flags)


def test_overlong_prompt_and_mismatched_tokenizer_are_one_line_errors(run_dir, tmp_path, capsys):
    d, _, tok = run_dir
    assert "does not fit the context of 256" in one_line_error(capsys, "generate", d, "the king " * 200)
    save_model(NanoSeek(preset("tiny", vocab_size=300)), tmp_path / "small")
    tok.save(tmp_path / "small")
    assert "do not belong together" in one_line_error(capsys, "chat", tmp_path / "small")
    save_model(NanoSeek(preset("tiny")), tmp_path / "bare")
    assert "no tokenizer" in one_line_error(capsys, "generate", tmp_path / "bare", "hi")


def test_empty_prompt_is_one_line_without_traceback(run_dir):
    r = subprocess.run([sys.executable, "-m", "nanoseek", "generate", str(run_dir[0]), " "],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "nanoseek generate: error: empty prompt: give some text (as an argument or on stdin)"


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60), stop=st.text(min_size=1, max_size=4))
def test_text_stream_adds_up_to_the_decoded_text(run_dir, text, stop):
    """Token by token, the incremental stream shows exactly the text (cut before the first stop string), and
    never shows a prefix of a stop string that then completes."""
    _, _, tok = run_dir
    ids = tok.encode(text)
    for stops in ([], [stop]):
        stream = TextStream(tok, stops)
        pieces = [stream.add(t) for t in ids]
        shown = "".join(pieces) + stream.finish()
        expected = text if not stops or stop not in text else text[: text.index(stop)]
        assert shown == expected == stream.text()
        if stops and stop in text:
            assert stop not in "".join(pieces)
