"""Inference benchmarks P4-P7, A and B interleaved in one run (best of --rounds); the last line printed is one
JSON object.

  P4  decode tokens/s at batch 1: the nanoseek engine vs transformers' DeepseekV3ForCausalLM.generate on the
      same exported weights (the random 8.3M model of /work/shared/BENCHMARKS.md), greedy, same prompt and
      number of new tokens; generation end to end, prefill included, for both.
  P5  aggregate tokens/s of 32 concurrent sequences vs batch 1 (same model, engine, float32).
  P6  KV-cache bytes per token per layer at the cpu preset's dims: the MLA latent cache vs the MHA-equivalent
      cache (per-head K and V at the same head dims); and whether greedy outputs are identical from the latent
      cache (absorbed attention), from per-head K/V expanded out of it (naive) and from full forwards.
  P7  MTP self-speculative decoding on a trained checkpoint (--checkpoint DIR; without it, `nanoseek pretrain`
      trains the cpu preset on Tiny Shakespeare for --train-seconds into runs/bench-infer, reused next time):
      draft acceptance rate and tokens/s vs plain greedy decoding at batch 1, and identical outputs.

    python bench/infer.py [--checkpoint runs/demo] [--rounds 3] [--new-tokens 64]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import nanoseek
from nanoseek.config import preset
from nanoseek.engine import Engine, KVCache, SamplingParams
from nanoseek.hf import export
from nanoseek.model import NanoSeek

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")


def best_of(rounds: int, runs: dict) -> dict:
    """{name: fn} -> {name: best seconds}, the variants interleaved round robin after one warm-up each."""
    for fn in runs.values():
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def p4_p5(args) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    # BENCHMARKS.md's reference model: hidden 256, 6 layers, 8 routed + 1 shared experts, top-2, q_lora 128,
    # kv_lora 64, vocab 4096
    ref = NanoSeek(preset("cpu", num_hidden_layers=6, n_routed_experts=8, q_lora_rank=128))
    N = args.new_tokens
    with tempfile.TemporaryDirectory() as d:
        export(ref, d)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d).eval()
        model, _ = nanoseek.load(d)  # the engine reads the very same exported files
    prompts = [torch.randint(0, 4096, (32,)).tolist() for _ in range(32)]
    greedy = SamplingParams(temperature=0, max_new_tokens=N)
    e1, e32 = Engine(model, max_batch=1), Engine(model, max_batch=32)
    e1_bf16, e32_bf16 = (Engine(model, max_batch=b, dtype=torch.bfloat16) for b in (1, 32))
    out = {}

    def hf_generate():
        with torch.inference_mode():
            out["hf"] = hf.generate(torch.tensor(prompts[:1]), max_new_tokens=N, min_new_tokens=N,
                                    do_sample=False)[0, 32:].tolist()

    def ours():
        out["ours"] = e1.generate(prompts[:1], greedy)[0].tokens

    t = best_of(args.rounds, {"hf": hf_generate, "b1": ours, "b32": lambda: e32.generate(prompts, greedy),
                              "b1_bf16": lambda: e1_bf16.generate(prompts[:1], greedy),
                              "b32_bf16": lambda: e32_bf16.generate(prompts, greedy)})
    tps = {k: (32 if k.startswith("b32") else 1) * N / v for k, v in t.items()}
    return {
        "p4_speedup_vs_transformers": round(tps["b1"] / tps["hf"], 2),
        "p4_transformers_tokens_per_s": round(tps["hf"], 1),
        "p4_nanoseek_tokens_per_s": round(tps["b1"], 1),
        "p4_nanoseek_bf16_tokens_per_s": round(tps["b1_bf16"], 1),
        "p4_same_tokens": out["hf"] == out["ours"],
        "p5_batch32_over_batch1": round(tps["b32"] / tps["b1"], 2),
        "p5_batch32_tokens_per_s": round(tps["b32"], 1),
        "p5_batch32_bf16_tokens_per_s": round(tps["b32_bf16"], 1),
        "p5_batch32_bf16_over_batch1": round(tps["b32_bf16"] / tps["b1"], 2),
    }


def p6() -> dict:
    cfg = preset("cpu")
    mla = KVCache(cfg, range(1), max_batch=1, max_len=1).bytes_per_token_per_layer
    mha = KVCache(cfg.replace(attention_type="mha"), range(1), max_batch=1, max_len=1).bytes_per_token_per_layer
    torch.manual_seed(0)
    model = NanoSeek(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (16,)).tolist()
    greedy = SamplingParams(temperature=0, max_new_tokens=48)
    outs = {impl: Engine(model, max_batch=1, impl=impl).generate([prompt], greedy)[0].tokens
            for impl in ("fast", "absorbed", "naive")}
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(48):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return {"p6_kv_cache_ratio": round(mha / mla, 2), "p6_mla_bytes_per_token_per_layer": mla,
            "p6_mha_bytes_per_token_per_layer": mha,
            "p6_outputs_identical": len({tuple(o) for o in outs.values()} | {tuple(ids[16:])}) == 1}


def trained_checkpoint(args) -> str:
    if args.checkpoint:
        return args.checkpoint
    run = Path("runs/bench-infer")
    if not (run / "base" / "model.safetensors").exists():
        print(f"P7: training the cpu preset for {args.train_seconds:.0f} s into {run} ...", flush=True)
        subprocess.run([sys.executable, "-m", "nanoseek", "pretrain", "--run", str(run), "--data", str(SHAKESPEARE),
                        "--preset", "cpu", "--vocab-size", "1024", "--seq-len", "128", "--batch-size", "32",
                        "--time-budget", str(args.train_seconds), "--eval-every", "0", "--eval-tokens", "16384"],
                       check=True, stdout=subprocess.DEVNULL)
    return str(run)


def p7(args) -> dict:
    path = trained_checkpoint(args)
    model, tok = nanoseek.load(path)
    if tok is None:
        raise SystemExit(f"{path} has no tokenizer")
    # prompts from the held-out end of the text (the trainer holds out the last 10%)
    text = SHAKESPEARE.read_text()[-50_000:]
    lines = [ln for ln in text.splitlines() if len(ln) > 30][:: 97][:4]
    prompts = [tok.encode(ln, bos=True) for ln in lines]
    greedy = SamplingParams(temperature=0, max_new_tokens=args.new_tokens * 2)
    plain, spec = Engine(model, max_batch=1), Engine(model, max_batch=1, speculative=True)
    out = {}

    def run(name, engine):
        def fn():
            out[name] = [engine.generate([p], greedy)[0].tokens for p in prompts]
        return fn

    t = best_of(args.rounds, {"plain": run("plain", plain), "spec": run("spec", spec)})
    n = sum(len(o) for o in out["spec"])
    return {"p7_mtp_acceptance": round(spec.stats["accepted"] / spec.stats["drafted"], 3),
            "p7_mtp_speedup": round(t["plain"] / t["spec"], 2),
            "p7_plain_tokens_per_s": round(n / t["plain"], 1), "p7_spec_tokens_per_s": round(n / t["spec"], 1),
            "p7_same_tokens": out["plain"] == out["spec"], "p7_checkpoint": path}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="trained run/checkpoint with an MTP module, for P7")
    ap.add_argument("--train-seconds", type=float, default=150, help="P7 training budget without --checkpoint")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    result = {"threads": torch.get_num_threads(), "new_tokens": args.new_tokens}
    result.update(p4_p5(args))
    print(json.dumps(result), flush=True)
    result.update(p6())
    result.update(p7(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
