"""The CLI surface: the verb list is frozen here, every verb has --help, bad input is one line."""

import subprocess
import sys

import pytest

from nanoseek.cli import VERBS, build_parser, main

EXPECTED_VERBS = ["tokenizer", "pretrain", "info", "export", "import", "generate", "chat", "serve"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, timeout=300)


def test_verbs_are_the_documented_ones():
    assert list(VERBS) == EXPECTED_VERBS


@pytest.mark.parametrize("verb", EXPECTED_VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([verb, "--help"])
    assert e.value.code == 0
    assert verb in capsys.readouterr().out


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--seq-len SEQ_LEN default: 256" in out and "per process (default: 32)" in out


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    import nanoseek.cli as cli

    def exhausted(args):
        raise MemoryError

    monkeypatch.setitem(cli.LOCAL, "info", (cli.LOCAL["info"][0], exhausted))
    assert main(["info", "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nanoseek info: error: out of memory") and err.count("\n") == 1


def test_info_preset(capsys):
    assert main(["info", "--preset", "tiny", "--set", "num_hidden_layers=3"]) == 0
    out = capsys.readouterr().out
    assert '"num_hidden_layers": 3' in out and "parameters:" in out


def test_a_config_file_is_applied_over_the_preset(tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"num_hidden_layers": 3, "model_type": "deepseek_v3"}')
    assert main(["info", "--preset", "tiny", "--config", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert '"num_hidden_layers": 3' in out and '"hidden_size": 64' in out and "model_type" not in out


def test_bad_override_is_one_line_error():
    r = run("info", "--preset", "tiny", "--set", "num_experts_per_tok=99")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "num_experts_per_tok" in r.stderr


def test_missing_path_is_one_line_error(tmp_path):
    r = run("export", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "does not exist" in r.stderr and r.stderr.strip().count("\n") == 0


def test_export_never_writes_among_other_files(tmp_path, capsys):
    from nanoseek.checkpoint import save_model
    from nanoseek.config import preset
    from nanoseek.model import NanoSeek

    save_model(NanoSeek(preset("tiny")), tmp_path / "run" / "base")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "texts")]) == 1
    assert "holds other files" in capsys.readouterr().err and sorted(p.name for p in (tmp_path / "texts").iterdir()) \
        == ["notes.txt"]
    for _ in range(2):  # a new directory, then the same export replaced
        assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    # (tiny has 2 layers and one MTP module, which transformers reports when it loads the directory)
    assert "it lists the MTP weights (layer 2) as UNEXPECTED and ignores them" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "hf" / "model.safetensors"), "hi"]) == 1
    assert "is a file: give the directory that holds it" in capsys.readouterr().err


def test_info_of_a_saved_model(tmp_path, capsys):
    from nanoseek.checkpoint import save_model
    from nanoseek.config import preset
    from nanoseek.model import NanoSeek

    save_model(NanoSeek(preset("tiny", num_hidden_layers=3)), tmp_path / "run" / "base")
    assert main(["info", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert '"num_hidden_layers": 3' in out and "parameters:" in out
