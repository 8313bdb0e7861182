"""DDP with 2 gloo processes on the CPU == one process with the same global batch (there: 2 ranks x 2
micro-batches x 2 sequences; here: one batch of 8)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import corpus_text, full_disk
from safetensors.torch import load_file

WORKER = str(Path(__file__).with_name("ddp_worker.py"))


def test_two_ranks_match_one_process(tmp_path):
    (tmp_path / "c.txt").write_text(corpus_text())
    common = ["--data", tmp_path / "c.txt", "--preset", "tiny", "--seq-len", "32", "--vocab-size", "320",
              "--max-steps", "6", "--eval-every", "0", "--log-every", "1", "--device", "cpu", "--optimizer", "adamw",
              "--dtype", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the single process makes the tokenizer and shards first; the DDP run reuses a copy of them
    single = tmp_path / "single"
    single.mkdir()
    r = subprocess.run([sys.executable, WORKER, single, "--run", tmp_path / "r1", "--batch-size", "8", *common],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    (tmp_path / "r2").mkdir()
    for part in ("tokenizer", "data"):
        subprocess.run(["cp", "-r", tmp_path / "r1" / part, tmp_path / "r2" / part], check=True)
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
                        ddp, "--run-dir", tmp_path / "r2", "--batch-size", "2", "--grad-accum", "2", *common],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1, w = (load_file(str(p)) for p in (ddp / "rank0.safetensors", ddp / "rank1.safetensors",
                                            single / "rank0.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the ranks never diverge (biases included)
    # and they followed the single process: gradients are summed in another order, so close, not equal
    # (AdamW in fp32 here: Muon's bf16 Newton-Schulz would turn 1e-7 differences into bf16-sized ones)
    diff = sum((w0[k] - w[k]).abs().sum() for k in w) / sum(w[k].abs().sum() for k in w)
    assert diff < 1e-3, diff
    ddp_summary, one = (json.loads((d / "summary0.json").read_text()) for d in (ddp, single))
    for key in ("val_loss", "val_bpb"):  # the ranks' evaluation windows are summed: all of val is scored
        assert abs(ddp_summary[key] - one[key]) < 1e-3 * one[key], key
    m1 = [json.loads(x) for x in (tmp_path / "r1" / "base" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "r2" / "base" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2):
        if "loss" in a:
            assert abs(a["loss"] - b["loss"]) < 1e-3 * a["loss"], (a, b)
    # rank 0 cannot save (a full disk): both ranks stop with a one-line error
    before = (tmp_path / "r2" / "base" / "checkpoint.safetensors").read_bytes()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
                        ddp, "--run-dir", tmp_path / "r2", "--batch-size", "2", "--grad-accum", "2", *common,
                        "--max-steps", "8", "--resume"], capture_output=True, text=True, env=env, timeout=300,
                       preexec_fn=full_disk)
    assert r.returncode != 0
    assert "could not write" in r.stderr and "rank 0 could not save the checkpoint" in r.stderr, r.stderr[-3000:]
    assert (tmp_path / "r2" / "base" / "checkpoint.safetensors").read_bytes() == before
    # and a corpus rank 0 cannot use stops both ranks before training
    (tmp_path / "empty.txt").write_text("")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
                        ddp, "--run-dir", tmp_path / "r3", *common, "--data", tmp_path / "empty.txt"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert "rank 0 could not prepare the tokenizer and the data" in r.stderr, r.stderr[-3000:]
    # and so does an OSError there (the run directory is a file), not only a UserError
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
                        ddp, "--run-dir", tmp_path / "c.txt", *common], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode != 0
    assert "rank 0 could not prepare the tokenizer and the data" in r.stderr, r.stderr[-3000:]
