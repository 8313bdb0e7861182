"""Forward+backward training throughput of the cpu and dense presets, fp32 vs bf16 autocast.

Runs the four variants interleaved (round robin, best of N rounds) because this machine is noisy.
Prints one JSON object as its last line.
"""

import argparse
import json
import time

import torch

from nanoseek.config import preset
from nanoseek.model import NanoSeek


def step_time(model, ids, dtype):
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(ids[:, :-1], ids[:, 1:])
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    models = {name: NanoSeek(preset(name)).train() for name in ("cpu", "dense")}
    ids = torch.randint(0, 4096, (args.batch, args.seq + 1))
    variants = [(n, d) for n in models for d in ("fp32", "bf16")]
    best = {v: float("inf") for v in variants}
    for v in variants:  # warm-up
        step_time(models[v[0]], ids, v[1])
    for _ in range(args.rounds):
        for v in variants:
            best[v] = min(best[v], step_time(models[v[0]], ids, v[1]))
    tokens = args.batch * args.seq
    result = {"batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads()}
    for (n, d), t in best.items():
        result[f"{n}_{d}_tokens_per_s"] = round(tokens / t)
        result[f"{n}_{d}_tflops"] = round(models[n].flops_per_token(args.seq) * tokens / t / 1e12, 3)
    for n in models:
        result[f"{n}_bf16_over_fp32"] = round(best[(n, "fp32")] / best[(n, "bf16")], 2)
    result["cpu_over_dense_bf16"] = round(best[("dense", "bf16")] / best[("cpu", "bf16")], 2)
    for (n, d) in variants:
        print(f"{n:6s} {d}: {result[f'{n}_{d}_tokens_per_s']:>8d} tokens/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
