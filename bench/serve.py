"""Serving benchmark: `nanoseek serve` in its own process, N concurrent streaming chat clients on loopback
(N = 1, 8, 32, 64 by default). Per N: aggregate completion tokens/s, p50/p99 time to first token, errors.
The last line printed is one JSON object.

    python bench/serve.py [--path runs/demo] [--clients 1 8 32 64] [--max-tokens 64] [--requests 2]

Without --path the model is the `cpu` preset with random weights and a tokenizer trained here on the default
corpus (throughput does not depend on what the weights say; every request runs max_tokens unless it ends).
Each client sends --requests requests one after another, so sequences join and leave the running batch.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["Tell me about the king.", "What is 12 + 7?", "Who was Moses?", "Write a short psalm.",
           "Count from one to ten.", "What is the capital of Judah?", "Explain the flood.", "Say something kind."]


def default_model(out: Path) -> Path:
    """cpu preset, random weights, tokenizer trained on the default corpus; saved as a run directory."""
    import torch

    from nanoseek.checkpoint import save_model
    from nanoseek.config import preset
    from nanoseek.data import default_corpus, load_documents
    from nanoseek.model import NanoSeek
    from nanoseek.tokenizer import train_tokenizer

    docs = load_documents([str(default_corpus())], "text")[:3000]
    tok = train_tokenizer(iter(docs), vocab_size=4096)
    torch.manual_seed(0)
    save_model(NanoSeek(preset("cpu", vocab_size=tok.vocab_size)), out / "base")
    tok.save(out / "tokenizer")
    return out


async def client(base: str, i: int, args, ttft: list, tokens: list, errors: list) -> None:
    async with httpx.AsyncClient(timeout=600) as http:
        for r in range(args.requests):
            body = {"messages": [{"role": "user", "content": PROMPTS[(i + r) % len(PROMPTS)]}], "stream": True,
                    "max_tokens": args.max_tokens, "temperature": 0.8, "seed": i * 100 + r,
                    "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first = None
            try:
                async with http.stream("POST", base + "/v1/chat/completions", json=body) as res:
                    if res.status_code != 200:
                        errors.append(f"{res.status_code}: {(await res.aread())[:200]!r}")
                        continue
                    seen = 0
                    async for line in res.aiter_lines():  # parsed lightly: the client shares the 2 cores
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        seen += 1
                        if seen == 2 and first is None:  # the first chunk only names the role
                            first = time.perf_counter() - t0
                        if '"usage"' in line or '"error"' in line:
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                errors.append(chunk["error"]["message"])
                            elif chunk.get("usage"):
                                tokens.append(chunk["usage"]["completion_tokens"])
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
            if first is not None:
                ttft.append(first)


async def round_of(base: str, n: int, args) -> dict:
    ttft, tokens, errors = [], [], []
    t0 = time.perf_counter()
    await asyncio.gather(*(client(base, i, args, ttft, tokens, errors) for i in range(n)))
    seconds = time.perf_counter() - t0
    q = statistics.quantiles(ttft, n=100, method="inclusive") if len(ttft) > 1 else ttft * 99
    return {"clients": n, "requests": n * args.requests, "completion_tokens": sum(tokens),
            "seconds": round(seconds, 2), "tokens_per_s": round(sum(tokens) / seconds, 1),
            "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
            "ttft_p99_s": round(q[98], 3) if ttft else None, "errors": len(errors), "error_samples": errors[:3]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", help="run or transformers directory to serve (default: a random cpu-preset model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="serve with torch.compile'd decode steps (the server's default)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.path) if args.path else default_model(Path(tmp) / "bench-serve")
        proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", str(path), "--port", "0",
                                 "--max-batch", str(args.max_batch), "--compile" if args.compile else "--no-compile"],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "NANOSEEK_API_KEY": ""})
        try:
            line = ""
            while " on http" not in line:  # (after "compiling ...", while the graphs compile)
                line = proc.stdout.readline()
                if not line:
                    sys.exit("the server did not start")
            base = line.split(" on ")[1].split()[0]
            asyncio.run(round_of(base, 2, argparse.Namespace(**{**vars(args), "requests": 1})))  # warm-up
            results = []
            for n in args.clients:
                r = asyncio.run(round_of(base, n, args))
                results.append(r)
                print(json.dumps(r), flush=True)
            metrics = httpx.get(base + "/metrics").json()
            busy = metrics["engine_step_seconds_total"] / metrics["uptime_s"]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    by_n = {r["clients"]: r for r in results}
    summary = {"model": str(args.path or "cpu preset (random weights)"), "compile": args.compile,
               "max_tokens": args.max_tokens,
               "requests_per_client": args.requests, "max_batch": args.max_batch, "rounds": results,
               "server_metrics": metrics, "engine_busy_fraction": round(busy, 3),
               "errors_total": sum(r["errors"] for r in results)}
    if 1 in by_n and 32 in by_n:
        summary["throughput_32_over_1"] = round(by_n[32]["tokens_per_s"] / by_n[1]["tokens_per_s"], 2)
    if 64 in by_n:
        summary["errors_at_64"] = by_n[64]["errors"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
