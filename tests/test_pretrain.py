"""End-to-end pretraining through the CLI: progress, metrics, exact resume after SIGKILL, bad input."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from helpers import corpus_text, full_disk
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanoseek.checkpoint import CheckpointError, atomic_write_text, read_training_info

TINY = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--vocab-size", "320", "--log-every", "2",
        "--eval-every", "10", "--threads", "1"]


def pretrain_args(run, corpus, *extra):
    """Parsed `nanoseek pretrain` arguments of a TINY run, for tests that call train() in-process."""
    from nanoseek.cli import build_parser

    return build_parser().parse_args(["pretrain", "--run", str(run), "--data", str(corpus), *TINY, *map(str, extra)])


def nanoseek(*args, check=True, **kw):
    r = subprocess.run([sys.executable, "-m", "nanoseek", *map(str, args)], capture_output=True, text=True,
                       timeout=300, **kw)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "text.txt").write_text(corpus_text())
    return d / "text.txt"


def metrics(run):
    return [json.loads(line) for line in (run / "base" / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_runs_logs_and_loads(tmp_path, corpus):
    r = nanoseek("pretrain", "--run", tmp_path / "run", "--data", corpus, "--max-steps", 20, *TINY)
    assert "tok/s" in r.stdout and "MFU" in r.stdout and "ETA" in r.stdout and "val bpb" in r.stdout
    m = metrics(tmp_path / "run")
    train = [e for e in m if "loss" in e]
    evals = [e for e in m if "val_bpb" in e]
    assert train[-1]["step"] == 20 and train[-1]["loss"] < train[0]["loss"]
    assert evals[-1]["step"] == 20 and 0 < evals[-1]["val_bpb"] < 8
    assert {"load_max_over_mean/1", "load_max_over_mean/mtp0", "grad_norm"} <= set(train[0])  # (layer 0: dense)
    assert train[-1]["lr_scale"] > 0  # the scale the step used (WSD decays to 0 after the last step)
    assert train[-1]["lr"] == pytest.approx(3e-3 * train[-1]["lr_scale"])  # AdamW's default rate, scaled
    assert train[-1]["muon_lr"] == pytest.approx(0.005 * train[-1]["lr_scale"])  # Muon's, for routed experts
    from nanoseek import load

    model, tok = load(tmp_path / "run")
    assert tok is not None and model.config.vocab_size == tok.vocab_size and not model.training
    # the trainer nudged every MoE layer's routing bias (auxiliary-loss-free balancing)
    assert all(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers())


def test_a_time_budget_spans_the_schedule(tmp_path, corpus):
    """`make demo`'s way: --time-budget without --max-steps; the WSD schedule decays over the seconds and the run
    ends after the budget with its final evaluation."""
    nanoseek("pretrain", "--run", tmp_path / "run", "--data", corpus, "--time-budget", 4, *TINY,
             "--eval-every", 0, "--log-every", 1)
    m = metrics(tmp_path / "run")
    train = [e for e in m if "loss" in e]
    # it stopped once the budget was spent (times are logged rounded to 1 ms)
    assert len(train) > 5 and train[-2]["time"] <= 4 <= train[-1]["time"]
    scales = [e["lr_scale"] for e in train]
    decay = scales[scales.index(1.0):]  # after the warm-up: flat, then down
    assert decay == sorted(decay, reverse=True) and decay[-1] < 0.3
    assert "val_bpb" in m[-1] and m[-1]["step"] == train[-1]["step"]


def test_gradient_accumulation_equals_one_big_batch(tmp_path, corpus):
    """--batch-size 4 --grad-accum 2 trains on the same 8 sequences per step as --batch-size 8: same losses."""
    common = ["--data", corpus, "--max-steps", 4, "--dtype", "fp32", "--eval-every", 0, *TINY]
    nanoseek("pretrain", "--run", tmp_path / "a", *common, "--batch-size", 8)
    nanoseek("pretrain", "--run", tmp_path / "b", *common, "--batch-size", 4, "--grad-accum", 2)
    for x, y in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b"), strict=True):
        for key in ("loss", "grad_norm", "val_bpb"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-4), (key, x, y)


def test_bits_per_byte_and_per_char_count_every_token_once():
    """val_loss is the mean nats of every token after <|bos|>; bpb/bpc divide the bits by the UTF-8 bytes /
    characters of the text (here they differ: the text is not ASCII)."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    from nanoseek.config import preset
    from nanoseek.evaluate import bits_per_byte
    from nanoseek.model import NanoSeek

    torch.manual_seed(0)
    model = NanoSeek(preset("tiny", vocab_size=64)).train()
    tokens = np.random.default_rng(0).integers(1, 64, 40)
    stream = torch.tensor([[0, *tokens]])
    with torch.no_grad():
        nats = F.cross_entropy(model.eval()(stream[:, :-1])[0], stream[0, 1:], reduction="sum").item()
    model.train()
    text = "naïve café ✓ " * 3
    n_bytes, n_chars = len(text.encode()), len(text)
    got = bits_per_byte(model, tokens, n_bytes, n_chars, seq_len=64, bos_id=0)
    assert got["val_loss"] == pytest.approx(nats / 40, rel=1e-5)
    assert got["val_bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert got["val_bpc"] == pytest.approx(nats / math.log(2) / n_chars, rel=1e-5)
    assert model.training  # left as it was found
    from nanoseek.errors import UserError

    for toks, size in ((np.array([0]), 0), (tokens, 0)):  # nothing scored; no text (only special tokens)
        with pytest.raises(UserError, match="no text to score"):
            bits_per_byte(model, toks, size, size, seq_len=64, bos_id=0)


def test_learning_rate_schedules():
    from nanoseek.optim import lr_scale

    wsd = [lr_scale(p, "wsd", warmup=0.1, decay=0.4, min_ratio=0.1) for p in (0.05, 0.1, 0.3, 0.6, 0.8, 1.0)]
    assert wsd[0] == pytest.approx(0.051 / 0.101) and wsd[1:4] == [1.0, 1.0, 1.0]
    assert wsd[4] == pytest.approx(0.1 + 0.9 * 0.5) and wsd[5] == pytest.approx(0.1)
    cos = [lr_scale(p, "cosine", warmup=0.2, decay=0.0, min_ratio=0.0) for p in (0.2, 0.6, 1.0)]
    assert cos == pytest.approx([1.0, 0.5, 0.0])
    assert lr_scale(0.99, "constant", warmup=0.0, decay=0.5) == 1.0


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, corpus):
    args = ["--data", corpus, "--max-steps", 40, "--save-every", 10, *TINY]
    nanoseek("pretrain", "--run", tmp_path / "a", *args)
    # same run, killed with SIGKILL right after its first periodic checkpoint, then resumed
    ckpt = tmp_path / "b" / "base" / "checkpoint.safetensors"
    sigkill_when(lambda: ckpt.exists() and read_training_info(ckpt)["step"] >= 10, tmp_path / "b", args)
    nanoseek("pretrain", "--run", tmp_path / "b", "--resume", *args)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b") or _same_losses(tmp_path / "a", tmp_path / "b")
    # killed before any periodic checkpoint: it resumes from the one written at step 0, as `make demo` does
    sigkill_when(lambda: logged(tmp_path / "d"), tmp_path / "d", args)
    assert read_training_info(tmp_path / "d" / "base" / "checkpoint.safetensors")["step"] == 0
    nanoseek("pretrain", "--run", tmp_path / "d", "--resume", *args)
    assert _same_losses(tmp_path / "a", tmp_path / "d")
    # Ctrl-C mid-run: the step in flight finishes, the run saves and exits with 130 (as a shell reports a Ctrl-C);
    # resumed, it is the same run
    stop_after_first_log(signal.SIGINT, tmp_path / "c", args)
    stopped_at = max(e["step"] for e in metrics(tmp_path / "c"))
    assert stopped_at < 40
    nanoseek("pretrain", "--run", tmp_path / "c", "--resume", *args)
    assert _same_losses(tmp_path / "a", tmp_path / "c")


def logged(run) -> bool:
    """Whether the run has logged a training step."""
    path = run / "base" / "metrics.jsonl"
    return path.exists() and any(line.endswith("}") for line in path.read_text().splitlines())


def start_pretrain(run, args, ready, **kw):
    """Start `pretrain --run run *args` and return it once ready() holds (or it ended)."""
    p = subprocess.Popen([sys.executable, "-m", "nanoseek", "pretrain", "--run", run, *map(str, args)], **kw)
    deadline = time.time() + 240
    while not ready() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return p


def sigkill_when(ready, run, args):
    p = start_pretrain(run, args, ready, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert max(e["step"] for e in metrics(run)) < 40


def stop_after_first_log(sig, run, args, twice=False):
    """Start `pretrain --run run *args`, send sig (twice: again 50 ms later) once it has logged a step: it must save
    and exit 128 + sig."""
    p = start_pretrain(run, args, lambda: logged(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.send_signal(sig)
    if twice:
        time.sleep(0.05)
        p.send_signal(sig)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 128 + sig and f"stopped by {sig.name}" in out and "Traceback" not in err, err
    assert (run / "base" / "checkpoint.safetensors").exists()


def test_sigterm_saves_and_exits_143(tmp_path, corpus):
    """What a cluster scheduler sends: the run stops as on Ctrl-C, with a checkpoint, and exits 128 + 15. Slurm
    signals every process of the job, and torchrun passes the signal on to its workers again: a repeat at once is
    the same request, not a second one that would stop without saving."""
    stop_after_first_log(signal.SIGTERM, tmp_path / "run", ["--data", corpus, "--max-steps", 400, *TINY], twice=True)


def _same_losses(a, b):
    # timings differ between the runs; every loss, bpb and step must not
    keys = ("step", "loss", "lm_loss", "mtp_loss", "val_loss", "val_bpb", "grad_norm")
    strip = lambda m: [{k: e[k] for k in keys if k in e} for e in m]
    assert strip(metrics(a)) == strip(metrics(b))
    return True


def test_bad_input_is_one_line_and_never_loses_a_checkpoint(tmp_path, corpus):
    def fails(*args, match, **kw):
        r = nanoseek("pretrain", *args, check=False, **kw)
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0 and match in r.stderr, r.stderr

    fails("--run", tmp_path / "x", "--data", tmp_path / "missing.txt", "--max-steps", 1, *TINY,
          match="does not exist")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    fails("--run", tmp_path / "x", "--data", tmp_path / "bin.txt", "--max-steps", 1, *TINY, match="binary")
    (tmp_path / "empty.txt").write_text("")
    fails("--run", tmp_path / "x", "--data", tmp_path / "empty.txt", "--max-steps", 1, *TINY, match="empty")
    (tmp_path / "short.txt").write_text(corpus_text(3))
    fails("--run", tmp_path / "s", "--data", tmp_path / "short.txt", "--max-steps", 1, *TINY,
          match="fewer than one training sequence")
    fails("--run", tmp_path / "none", "--data", corpus, "--max-steps", 1, "--resume", *TINY, match="no checkpoint")
    fails("--run", tmp_path / "x", "--data", corpus, "--max-steps", 1, *TINY, "--log-every", 0, match="--log-every")
    fails("--run", corpus, "--data", corpus, "--max-steps", 1, *TINY, match="Not a directory")  # --run is a file
    for flag, value in (("--threads", 0), ("--warmup", 2), ("--time-budget", "nan"), ("--lr", 11),
                        ("--eval-tokens", -1), ("--eval-tokens", 1), ("--seed", -1), ("--warmup", 0.7)):
        fails("--run", tmp_path / "x", "--data", corpus, "--max-steps", 1, *TINY, flag, value, match=flag)

    run = tmp_path / "run"
    nanoseek("pretrain", "--run", run, "--data", corpus, "--max-steps", 4, "--save-every", 2, *TINY)
    before = (run / "base" / "checkpoint.safetensors").read_bytes()
    # a tokenizer that is not the checkpoint's
    other = tmp_path / "other"
    nanoseek("tokenizer", "--run", other, "--data", corpus, "--vocab-size", 300)
    (run / "tokenizer" / "tokenizer.json").rename(run / "tokenizer.json.bak")
    (other / "tokenizer" / "tokenizer.json").rename(run / "tokenizer" / "tokenizer.json")
    fails("--run", run, "--data", corpus, "--max-steps", 8, "--resume", *TINY, match="tokenizer")
    (run / "tokenizer.json.bak").rename(run / "tokenizer" / "tokenizer.json")
    # arguments that fix the data and its saved position
    fails("--run", run, "--data", corpus, "--max-steps", 8, "--resume", *TINY, "--seq-len", 16, match="--seq-len")
    fails("--run", run, "--max-steps", 8, "--resume", *TINY, match="--data")
    # --resume keeps the run's own model: --preset/--set asking for another one is refused, not silently ignored
    fails("--run", run, "--data", corpus, "--max-steps", 8, "--resume", *TINY, "--set", "num_hidden_layers=3",
          match="num_hidden_layers=3 (the run has 2)")
    fails("--run", run, "--data", corpus, "--max-steps", 8, "--resume", *TINY, "--preset", "dense",
          match="--preset/--config/--set ask for another")
    # the disk fills up while saving
    fails("--run", run, "--data", corpus, "--max-steps", 8, "--resume", *TINY, match="could not write",
          preexec_fn=full_disk)
    assert (run / "base" / "checkpoint.safetensors").read_bytes() == before
    assert not [p for p in os.listdir(run / "base") if p.endswith(".tmp")]
    (run / "base" / ".checkpoint.safetensors.killed.tmp").write_bytes(before)  # left by a writer killed mid-save
    # the same file, spelt another way and relative to another working directory
    respelt, shards = f".//{corpus.name}", (run / "data" / "meta.json").stat().st_mtime_ns
    nanoseek("pretrain", "--run", run, "--data", respelt, "--max-steps", 8, "--resume", *TINY, cwd=corpus.parent)
    assert (run / "data" / "meta.json").stat().st_mtime_ns == shards  # nor are its shards made again
    assert not [p for p in os.listdir(run / "base") if p.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "base" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    # the same command again without --resume would start over on top of the trained model: refused
    before = (run / "base" / "checkpoint.safetensors").read_bytes()
    fails("--run", run, "--data", corpus, "--max-steps", 8, *TINY, match="--overwrite")
    assert (run / "base" / "checkpoint.safetensors").read_bytes() == before
    # resuming a finished run evaluates it again but does not log a second final evaluation
    nanoseek("pretrain", "--run", run, "--data", corpus, "--max-steps", 8, "--resume", *TINY)
    assert [e["step"] for e in metrics(run) if "val_bpb" in e] == [4, 8]  # the 4-step run's end, then 8 once
    (run / "base" / "metrics.jsonl").open("a").write('{"step": 9, "loss": 1.')  # a line cut short by a crash
    nanoseek("pretrain", "--run", run, "--data", corpus, "--max-steps", 2, "--overwrite", *TINY)
    assert [e["step"] for e in metrics(run) if "loss" in e] == [2]
    # a corpus file that changed after the checkpoint: its data position would mean other text
    own = tmp_path / "own.txt"
    own.write_text(corpus_text())
    nanoseek("pretrain", "--run", tmp_path / "grow", "--data", own, "--max-steps", 2, *TINY)
    with own.open("a") as f:
        f.write(corpus_text(100, seed=1))
    fails("--run", tmp_path / "grow", "--data", own, "--max-steps", 4, "--resume", *TINY, match="training tokens")
    own.write_text(corpus_text())  # back as it was (a new mtime): tokenized again to the same tokens, resumed
    nanoseek("pretrain", "--run", tmp_path / "grow", "--data", own, "--max-steps", 4, "--resume", *TINY)
    # a checkpoint of an older version (no hash of its tokens) resumes as before
    rewrite_info(tmp_path / "grow", lambda info: {k: v for k, v in info.items() if k != "data_sha"})
    nanoseek("pretrain", "--run", tmp_path / "grow", "--data", own, "--max-steps", 6, "--resume", *TINY)
    # a checkpoint that is not a whole one (another program's, a damaged one): one line, not a traceback
    for damage, match in ((lambda info: [], "not a training checkpoint's"),
                          (lambda info: {**info, "loader": "0"}, "not a training checkpoint's"),
                          (lambda info: {**info, "param_groups": None}, "not a whole training checkpoint"),
                          (lambda info: {k: v for k, v in info.items() if k != "param_groups"},
                           "not a whole training checkpoint")):
        original = rewrite_info(run, damage)
        fails("--run", run, "--data", corpus, "--max-steps", 4, "--resume", *TINY, match=match)
        rewrite_info(run, lambda _, original=original: original)


def rewrite_info(run, change) -> dict:
    """Replace the JSON info of the run's checkpoint by change(info); returns the info it had."""
    ckpt = run / "base" / "checkpoint.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        info = json.loads(f.metadata()["info"])
    save_file(load_file(str(ckpt)), str(ckpt), metadata={"info": json.dumps(change(info))})
    return info


def test_a_directory_that_refuses_fsync_still_gets_its_file(tmp_path, monkeypatch):
    """FUSE, CIFS and 9p mounts refuse fsync on a directory (EINVAL): the renamed file is in place, so the write
    succeeded. A real I/O error there still fails it."""
    real_fsync = os.fsync

    def fsync(fd, error=errno.EINVAL):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(error, os.strerror(error))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}"
    monkeypatch.setattr(os, "fsync", lambda fd: fsync(fd, errno.EIO))
    with pytest.raises(CheckpointError, match="could not write"):
        atomic_write_text(tmp_path / "b.json", "{}")


def test_resume_takes_this_runs_learning_rate():
    import torch

    from nanoseek.config import preset
    from nanoseek.model import NanoSeek
    from nanoseek.optim import Optimizers

    model = NanoSeek(preset("tiny"))
    first = Optimizers(model, lr=3e-3, weight_decay=0.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    first.step()
    second = Optimizers(model, lr=1e-4, muon_lr=2e-4, weight_decay=0.1)
    second.load_state_dict(first.state_dict())
    second.set_lr(1.0)
    assert [(g["lr"], g["weight_decay"]) for o in second.opts for g in o.param_groups] == [(2e-4, 0.1), (1e-4, 0.0)]
    assert second.opts[1].state[model.lm_head.weight]["step"] == 1  # the moments and step counts are the saved ones


@pytest.mark.parametrize("name", ["cpu", "dense", "tiny"])
def test_optimizer_groups(name):
    """Every parameter in exactly one group; Muon only on hidden matrices other than attention's inputs."""
    import torch

    from nanoseek.config import preset
    from nanoseek.model import NanoSeek
    from nanoseek.optim import ATTENTION_INPUTS, EXPERT_NS_STEPS, Optimizers, orthogonalize, param_groups

    model = NanoSeek(preset(name))
    muon, adamw = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(map(id, muon + adamw)) == sorted(map(id, model.parameters()))
    muon_modules = {names[id(p)].split(".")[-2] for p in muon}
    assert all(p.ndim >= 2 for p in muon) and muon_modules.isdisjoint(ATTENTION_INPUTS)
    assert "o_proj" in muon_modules and not muon_modules & {"embed_tokens", "lm_head", "gate"}
    adamw_modules = {names[id(p)].split(".")[-2] for p in adamw if p.ndim >= 2}
    assert adamw_modules - {"embed_tokens", "lm_head", "gate"} == {n.split(".")[-2] for n in names.values()} & set(
        ATTENTION_INPUTS)
    assert adamw_modules & {"q_proj", "q_a_proj"}  # every preset has a query projection, trained by AdamW
    for p in muon:  # the update is near-orthogonal: Newton-Schulz moves the bulk of the singular values near 1
        steps = getattr(p, "muon_ns_steps", 5)
        assert (steps == EXPERT_NS_STEPS) == (".experts." in names[id(p)])  # fewer for the routed experts only
        s = torch.linalg.svdvals(orthogonalize(torch.randn(getattr(p, "muon_view", p.shape)), steps).float())
        assert s.max() < 1.3 and s.median() > 0.6, names[id(p)]
    # Muon's rate: the measured default for the model (lower with routed experts) unless given
    rate = 0.005 if name in ("tiny", "cpu") else 0.01
    assert Optimizers(model).opts[0].param_groups[0]["lr"] == rate
    assert Optimizers(model, muon_lr=0.02).opts[0].param_groups[0]["lr"] == 0.02
    if name != "dense":  # Muon's step moves a routed expert by its 3-step orthogonalised update, not the 5-step one
        w = model.model.layers[-1].mlp.experts.gate_up_proj
        w.grad = torch.randn_like(w)
        before = w.detach().clone()
        Optimizers(model).opts[0].step()
        step = (before - w.detach()) / rate
        for steps, close in ((EXPERT_NS_STEPS, True), (5, False)):
            expected = orthogonalize(w.grad.view(w.muon_view), steps).view(w.shape).float()
            assert torch.allclose(step, expected, atol=0.02) == close


def test_muon_batched_step_equals_one_matrix_at_a_time():
    """Muon orthogonalises same-shaped matrices as one batch: two steps (momentum, weight decay) of every Muon tensor
    of the cpu preset (square, wide, tall, stacked experts) equal Muon's update computed for each tensor alone."""
    import torch

    from nanoseek.config import preset
    from nanoseek.model import NanoSeek
    from nanoseek.optim import Muon, orthogonalize, param_groups

    torch.manual_seed(0)
    params = param_groups(NanoSeek(preset("cpu")))[0]
    assert len({getattr(p, "muon_view", p.shape)[-2:] for p in params}) > 2  # several shapes, tall ones too
    lr, wd, mom = 0.01, 0.1, 0.95
    expected = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    opt = Muon(params, lr=lr, weight_decay=wd, momentum=mom)
    for _ in range(2):
        for p, e, buf in zip(params, expected, bufs):
            p.grad = torch.randn_like(p)
            buf.lerp_(p.grad, 1 - mom)
            shape = getattr(p, "muon_view", p.shape)
            o = orthogonalize(p.grad.lerp(buf, mom).reshape(shape), getattr(p, "muon_ns_steps", 5)).float()
            o = o.reshape(p.shape)
            e.mul_(1 - lr * wd).add_(o * max(1.0, shape[-2] / shape[-1]) ** 0.5, alpha=-lr)
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, atol=2e-5, rtol=0)


def test_divergence_stops_before_the_update_and_world_is_checked(tmp_path, corpus, monkeypatch):
    """In-process: a NaN gradient norm at step 3 stops the run before that update (the step-2 checkpoint and the
    weights stay finite); a checkpoint written by another number of processes is not resumed."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nanoseek.errors import UserError
    from nanoseek.pretrain import train

    run = tmp_path / "run"
    args = lambda *extra: pretrain_args(run, corpus, "--max-steps", 4, "--save-every", 2, *extra)
    calls = {"n": 0}
    clip = torch.nn.utils.clip_grad_norm_

    def nan_at_third(params, max_norm):
        calls["n"] += 1
        norm = clip(params, max_norm)
        return torch.tensor(float("nan")) if calls["n"] == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_at_third)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # TINY's --threads 1: not for the whole session
    with pytest.raises(UserError, match="gradient norm became nan at step 3"):
        train(args())
    monkeypatch.undo()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    ckpt = run / "base" / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["info"])
    assert info["step"] == 2 and all(t.isfinite().all() for t in tensors.values() if t.is_floating_point())
    save_file(tensors, str(ckpt), metadata={**meta, "info": json.dumps({**info, "world": 2})})
    with pytest.raises(UserError, match="trained by 2 processes, not 1"):
        train(args("--resume"))


def test_compiled_training_equals_eager(tmp_path, corpus, monkeypatch, capsys, compiler):
    """--compile trains the same model: the losses of three compiled steps equal the eager run's (inductor may
    order float sums differently, hence a tolerance); without a graph break (one would cost a second trace of
    the model at every compile); and with a backward torch can cache on disk (an autocast block in the graph made
    it compile the backward again at every run)."""
    import torch

    from nanoseek.pretrain import train

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # TINY's --threads 1: not for the whole session
    losses = {}
    for mode in ("eager", "compiled"):
        run = tmp_path / mode
        compile_flag = ["--compile"] if mode == "compiled" else []
        torch._dynamo.utils.counters.clear()
        train(pretrain_args(run, corpus, "--max-steps", 3, "--log-every", 1, *compile_flag))
        losses[mode] = [e["loss"] for e in metrics(run) if "loss" in e]
    assert "does not work here" not in capsys.readouterr().err  # it did compile
    assert not torch._dynamo.utils.counters["graph_break"]
    assert not torch._dynamo.utils.counters["aot_autograd"]["autograd_cache_bypass"]
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=2e-3)


def test_compile_falls_back_to_eager_without_a_compiler(tmp_path, corpus, monkeypatch, capsys):
    """--compile where torch.compile cannot build kernels (no C++ compiler) trains eagerly and says why, instead of
    failing at the first step."""
    import torch

    from nanoseek.pretrain import train

    def no_compiler(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx\n"
                               "more detail")
        return call

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    _, summary = train(pretrain_args(tmp_path / "run", corpus, "--max-steps", 2, "--compile"))
    assert summary["step"] == 2
    assert ("torch.compile does not work here (InvalidCxxCompiler: No working C++ compiler found in "
            "torch._inductor.config.cpp.cxx); training without it") in capsys.readouterr().err
