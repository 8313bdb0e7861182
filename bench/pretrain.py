"""The pretraining race. Prints one JSON object as its last line.

P1  nanoGPT race on Tiny Shakespeare (val = last 10% of the file, nanoGPT's split): the training time our
    best CPU configuration needs to reach nanoGPT's final 2.720 bits per character, and the bits per
    character we reach in nanoGPT's 167.8 s.
P2  DeepSeek (`cpu` preset) vs `dense` preset at equal wall clock on the default corpus: val bits per byte,
    the mean over seeds (--p2-seeds, each preset once per seed, interleaved).
    Both presets train with --compile (--no-p2-compile: eager); compiling counts against their seconds.
P3  model FLOPs per second over the bf16 matmul peak measured in the same process (cpu preset, P2's run).

Clocks count training steps only (evaluation and checkpointing are excluded and reported apart).
    python bench/pretrain.py                    # everything (~25 minutes on 2 cores)
    python bench/pretrain.py --only p1 --p1-seconds 60
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from nanoseek.pretrain import measured_peak_flops

# nanoGPT's Tiny Shakespeare (karpathy/char-rnn's input.txt, 1.1 MB); this project's machines hold it beside the
# repository, elsewhere give --shakespeare
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_SECONDS = 167.8
NANOGPT_BPC = 1.8857 / math.log(2)  # 2.720 bits per character

# our best CPU configuration for Tiny Shakespeare (1 MB: a small vocabulary and a small model)
P1_ARGS = ["--preset", "cpu", "--vocab-size", "1024", "--seq-len", "128", "--batch-size", "32",
           "--set", "num_nextn_predict_layers=0", "--set", "num_hidden_layers=4",
           "--lr", "3e-3", "--muon-lr", "0.02", "--schedule", "wsd", "--decay", "0.4"]


def run(run_dir: Path, *args: str):
    """`nanoseek pretrain` in a fresh process, as a user runs it: no run inherits another's heap or kernel
    caches (run in the bench's own process after P1 and the dense runs, the cpu preset trained at 6021 tokens/s
    against 6157-7007 in fresh processes, while dense did not slow down). Returns the final evaluation (with
    step, time, tokens and all evaluations) and all metrics."""
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--run", str(run_dir), "--overwrite", "--save-every", "0",
           *args]
    if subprocess.run(cmd).returncode:
        sys.exit(f"bench: failed: {' '.join(cmd)}")
    metrics = [json.loads(x) for x in (run_dir / "base" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "val_loss" in m]
    return {**evals[-1], "train_time": evals[-1]["time"], "evals": evals}, metrics


def first_time_below(evals: list[dict], key: str, target: float) -> float | None:
    """Training time at which `key` first reaches target, interpolated linearly between evaluations."""
    prev = None
    for e in evals:
        if e[key] <= target:
            if prev is None:
                return e["time"]
            f = (prev[key] - target) / (prev[key] - e[key])
            return prev["time"] + f * (e["time"] - prev["time"])
        prev = e
    return None


def p1(work: Path, seconds: float, race_seconds: float, shakespeare: Path) -> dict:
    if not shakespeare.is_file():
        sys.exit(f"bench: P1 needs Tiny Shakespeare, not found at {shakespeare}: give --shakespeare FILE (nanoGPT's "
                 "data/shakespeare_char/input.txt), or --only p2")
    data = ["--data", str(shakespeare)]
    # the full nanoGPT time: bits per character at 167.8 s
    full, _ = run(work / "p1_full", *data, *P1_ARGS, "--time-budget", str(seconds), "--eval-every", "0")
    # a short run with its own schedule: when does it cross 2.720 bits per character?
    race, _ = run(work / "p1_race", *data, *P1_ARGS, "--time-budget", str(race_seconds), "--eval-every", "5")
    t = first_time_below(race["evals"], "val_bpc", NANOGPT_BPC)
    return {"p1_seconds_to_nanogpt_loss": round(t, 2) if t else None,
            "p1_race_budget_seconds": race_seconds,
            "p1_race_final_bpc": round(race["val_bpc"], 4),
            "p1_bits_per_char_at_nanogpt_time": round(full["val_bpc"], 4),
            "p1_improvement_bits_per_char": round(NANOGPT_BPC - full["val_bpc"], 4),
            "p1_seconds": round(full["train_time"], 1)}


def p2(work: Path, seconds: float, seeds: int, compile: bool) -> dict:
    """Each preset once per seed, interleaved (dense, cpu, dense, cpu, ...) so that the machine's drift in speed
    and the seed's luck fall on both alike; the figures are means over the seeds. With `compile`, both presets
    train compiled, and the compilation (in the first steps) counts against their seconds."""
    common = ["--seq-len", "128", "--batch-size", "32", "--time-budget", str(seconds), "--eval-every", "0",
              *(["--compile"] if compile else [])]
    runs = {"dense": [], "deepseek": []}
    for seed in range(seeds):
        for name in ("dense", "cpu"):  # the same tokenizer and shards for all (made by the first run)
            summary, metrics = run(work / "p2", "--preset", name, "--seed", str(seed), *common)
            mfu = [m["mfu"] for m in metrics if "mfu" in m][1:]  # the first window includes warm-up
            runs["deepseek" if name == "cpu" else name].append(
                {"bpb": summary["val_bpb"], "steps": summary["step"],
                 "tokens_per_s": summary["tokens"] / summary["train_time"],
                 "mfu": statistics.median(mfu) if mfu else None})
            (work / "p2" / "base").rename(work / f"p2_{name}_seed{seed}")
    out = {"p2_seconds": seconds, "p2_seeds": seeds, "p2_compiled": compile}
    for key, rs in runs.items():
        out[f"p2_bpb_{key}"] = round(statistics.mean(r["bpb"] for r in rs), 4)
        out[f"p2_bpb_{key}_per_seed"] = [round(r["bpb"], 4) for r in rs]
        out[f"p2_steps_{key}"] = round(statistics.mean(r["steps"] for r in rs))
        out[f"p2_tokens_per_s_{key}"] = round(statistics.mean(r["tokens_per_s"] for r in rs))
        mfu = [r["mfu"] for r in rs if r["mfu"] is not None]
        out[f"p3_mfu_{key}"] = round(statistics.mean(mfu), 4) if mfu else None
    out["p2_deepseek_gain"] = round(1 - out["p2_bpb_deepseek"] / out["p2_bpb_dense"], 4)
    out["p3_flops_utilisation_bf16"] = out["p3_mfu_deepseek"]
    out["p3_peak_bf16_tflops"] = round(measured_peak_flops("cpu", "bf16") / 1e12, 3)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["p1", "p2"])
    ap.add_argument("--shakespeare", type=Path, default=SHAKESPEARE, help=f"Tiny Shakespeare for P1 ({SHAKESPEARE})")
    ap.add_argument("--p1-seconds", type=float, default=NANOGPT_SECONDS)
    ap.add_argument("--p1-race-seconds", type=float, default=40.0)
    ap.add_argument("--p2-seconds", type=float, default=240.0)
    ap.add_argument("--p2-seeds", type=int, default=2, help="runs of each preset (one per seed), interleaved")
    ap.add_argument("--p2-compile", action=argparse.BooleanOptionalAction, default=True,
                    help="P2/P3 with --compile for both presets (default; --no-p2-compile: eager)")
    ap.add_argument("--work", help="directory for the runs (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="nanoseek-bench-"))
    result = {}
    if args.only in (None, "p1"):
        result.update(p1(work, args.p1_seconds, args.p1_race_seconds, args.shakespeare))
    if args.only in (None, "p2"):
        result.update(p2(work, args.p2_seconds, args.p2_seeds, args.p2_compile))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
