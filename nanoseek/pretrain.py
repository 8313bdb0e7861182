"""`nanoseek pretrain`: tokenizer (if absent) -> token shards (if absent) -> the training loop.

    nanoseek pretrain --run runs/demo --time-budget 600          # the built-in default corpus
    nanoseek pretrain --run runs/mine --data ~/texts/ --max-steps 2000
    torchrun --standalone --nproc_per_node=2 -m nanoseek pretrain --run-dir runs/ddp ...

Writes runs/<name>/base/: config.json + model.safetensors (the model, for load/chat/export),
checkpoint.safetensors (model + optimizer + RNG + data position, for --resume) and metrics.jsonl.
Each optimizer step: Muon/AdamW update, then the aux-loss-free expert-bias update from the step's load.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from nanoseek import parallel
from nanoseek.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_training_state,
    read_config,
    read_training_info,
    save_config,
    save_model,
    save_training_state,
)
from nanoseek.cli import add_model_arguments, model_config, pick_device
from nanoseek.config import ModelConfig
from nanoseek.data import (
    TokenLoader,
    add_data_arguments,
    corpus_files,
    ensure_data,
    ensure_tokenizer,
    load_tokens,
    tokenizer_fingerprint,
)
from nanoseek.errors import UserError, first_line
from nanoseek.evaluate import autocast, bits_per_byte
from nanoseek.model import NanoSeek
from nanoseek.optim import Optimizers, lr_scale
from nanoseek.tokenizer import Tokenizer

EVAL_TOKENS = 1 << 18
"""Default cap on the val tokens an evaluation scores: all of the built-in corpus's val split (~210k tokens) and of
Tiny Shakespeare's, the first 262k of a larger corpus's (10% of a 300 MB folder would take hours at each
evaluation). The windows go --batch-size at a time: the cpu preset scores the built-in val split in 9.8 s on the
2-core AMD EPYC (32768 tokens: 1.6 s, against 3.8-4.9 s one window at a time)."""


def add_arguments(p) -> None:
    add_data_arguments(p)
    add_model_arguments(p)
    g = p.add_argument_group("training")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-steps", type=int, help="optimizer steps (the schedule spans them)")
    g.add_argument("--time-budget", type=float, help="seconds of training (the schedule spans them)")
    g.add_argument("--optimizer", choices=["muon", "adamw"], default="muon")
    g.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    g.add_argument("--muon-lr", type=float,
                   help="Muon learning rate (default: 0.005 for a model with routed experts, 0.01 for a dense one)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="decoupled, on Muon's matrices (--optimizer adamw: the same ones); not on attention's input "
                   "projections, embeddings, head, norms, router")
    g.add_argument("--schedule", choices=["wsd", "cosine", "constant"], default="wsd")
    g.add_argument("--warmup", type=float, default=0.02, help="warm-up, fraction of the run")
    g.add_argument("--decay", type=float, default=0.4, help="WSD: final decay, fraction of the run")
    g.add_argument("--min-lr-ratio", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="autocast dtype of matmuls")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    g.add_argument("--eval-every", type=int, default=200, help="steps between val evaluations (0: end only)")
    g.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS,
                   help=f"cap on val tokens per evaluation, the first of the val split ({EVAL_TOKENS}; 0: all)")
    g.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from <run>/base/checkpoint.safetensors")
    g.add_argument("--overwrite", action="store_true", help="start again in a run that already holds a model "
                   "(replacing it; without this flag such a run is refused)")


def run(args) -> int:
    """Exit status: 0, or 128 + the signal's number when a signal stopped the run (after saving)."""
    _, summary = train(args)
    return 128 + summary["signal"] if summary.get("interrupted") else 0


# --- set-up steps ------------------------------------------------------------------------------------

_PEAK: dict = {}


def measured_peak_flops(device: str, dtype: str) -> float:
    """Best matmul FLOP/s of this device in this dtype, measured once per process (MFU's denominator)."""
    key = (device, dtype)
    if key not in _PEAK:
        n, dt = 2048, torch.bfloat16 if dtype == "bf16" else torch.float32
        a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
        best = float("inf")
        for _ in range(6):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        _PEAK[key] = 2 * n**3 / best
    return _PEAK[key]


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --- the loop ----------------------------------------------------------------------------------------

def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default every allocation over 32 MB (logits, their gradients, the softmax of a 4096-token batch) is a
    fresh mmap, freed with munmap, and each of its pages is faulted in and zeroed again by the kernel at the
    next step: ~100k page faults per training step of the cpu preset, a third of its time (measured: 567 ->
    385 ms per forward+backward). With mmap off and no trimming, the heap keeps its peak size and later steps
    reuse it. No-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    mallopt(M_TOP_PAD, 1 << 28)


def train(args):
    """The whole pretraining run; returns (model, summary dict)."""
    if args.data:  # absolute: the checkpoint's record of them holds from any directory a resume is run in
        args.data = [os.path.abspath(os.path.expanduser(s)) for s in args.data]
    if not args.max_steps and not args.time_budget:
        raise UserError("give --max-steps or --time-budget (or both: whichever ends first)")
    if args.seq_len < 2 or args.batch_size < 1 or args.grad_accum < 1 or args.log_every < 1:
        raise UserError("--seq-len must be >= 2, --batch-size, --grad-accum and --log-every >= 1")
    if (args.max_steps or 0) < 0 or not math.isfinite(args.time_budget or 0) or (args.time_budget or 0) < 0 \
            or min(args.eval_every, args.save_every, args.eval_tokens) < 0:
        raise UserError("--max-steps, --time-budget, --eval-every, --save-every and --eval-tokens must be numbers "
                        ">= 0")
    if args.eval_tokens == 1:
        raise UserError("--eval-tokens 1 scores no token (the first is the <|bos|> the others follow): give 0 "
                        "(all) or at least 2")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed {args.seed}: give an integer from 0 to 2**63 - 1")
    if not (0 <= args.warmup <= 1 and 0 <= args.decay <= 1 and 0 <= args.min_lr_ratio <= 1):
        raise UserError("--warmup, --decay and --min-lr-ratio are fractions: give values from 0 to 1")
    if args.schedule == "wsd" and args.warmup + args.decay > 1:
        raise UserError(f"--warmup {args.warmup} and --decay {args.decay} overlap: with --schedule wsd they are "
                        "parts of one run and add up to at most 1")
    if not (0 < args.lr <= 10 and (args.muon_lr is None or 0 < args.muon_lr <= 10) and args.weight_decay >= 0
            and args.clip >= 0):
        raise UserError("--lr and --muon-lr must be > 0 and <= 10, --weight-decay and --clip >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: give at least 1")
        torch.set_num_threads(args.threads)
    d = parallel.init(pick_device(args.device))
    if d.device == "cpu":
        keep_freed_memory()
    torch.manual_seed(args.seed)
    run_dir, stage = Path(args.run), Path(args.run) / "base"
    ckpt_path = stage / "checkpoint.safetensors"
    if args.resume:
        info = read_training_info(ckpt_path)
        _check_resume_arguments(args, info.get("args", {}))
        if info.get("world", d.world) != d.world:
            raise UserError(f"--resume: the run was trained by {info['world']} processes, not {d.world}: the "
                            "global batch and the data position would change; resume with as many")
    elif not args.overwrite and (ckpt_path.exists() or (stage / "model.safetensors").exists()):
        raise UserError(f"{stage} already holds a model: --resume to continue its run, or --overwrite to start "
                        "again and replace it")

    # configuration: a resumed run keeps its own; a new one takes preset/config/--set
    if args.resume:
        saved = read_config(stage / "config.json")
        saved.pop("model_type", None)
        cfg = ModelConfig.from_dict(saved)
        _check_resume_config(args, cfg)
    else:
        cfg = model_config(args)

    def prepare():
        tok = ensure_tokenizer(args, run_dir, cfg.vocab_size, renew=args.overwrite and not args.resume)
        return tok, ensure_data(args, run_dir, tok, args.seq_len + 1)

    prepared = parallel.on_main(d, prepare, "prepare the tokenizer and the data")
    if d.main:
        tok, meta = prepared
    else:
        tok = Tokenizer.load(run_dir / "tokenizer")
        meta = json.loads((run_dir / "data" / "meta.json").read_text())
    if args.resume and info.get("tokenizer_sha") != tokenizer_fingerprint(tok):
        raise CheckpointError(f"the tokenizer in {run_dir / 'tokenizer'} is not the one {ckpt_path} was trained "
                              "with")
    if args.resume and info.get("data_sha") not in (None, meta["train"].get("sha256")):
        raise UserError(f"--resume: the training tokens are not those {ckpt_path} was trained on (a corpus file "
                        "changed), so its data position would mean other text: restore the corpus, or start again "
                        "with --overwrite")
    if not args.resume:  # the model's vocabulary is the tokenizer's
        cfg = cfg.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                          pad_token_id=tok.pad_id)
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"the tokenizer in {run_dir / 'tokenizer'} has {tok.vocab_size} tokens but the "
                              f"checkpoint's model only {cfg.vocab_size}: they do not belong together")
    if args.seq_len > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")

    model = NanoSeek(cfg).to(d.device)
    opt = Optimizers(model, args.optimizer, args.lr, args.muon_lr, args.weight_decay)
    train_tokens, val_tokens = load_tokens(run_dir / "data", "train"), load_tokens(run_dir / "data", "val")
    loader = TokenLoader(train_tokens, args.batch_size, args.seq_len, args.seed, d.rank, d.world)
    step, train_time, tokens_seen = 0, 0.0, 0
    if args.resume:
        states, info = load_training_state(ckpt_path, model)
        try:
            opt.load_state_dict(states)
            loader.load_state_dict(info["loader"])
            step, train_time, tokens_seen = info["step"], info["train_time"], info["tokens"]
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as e:
            # another version's layout, a changed optimizer grouping, a damaged checkpoint
            raise CheckpointError(f"{ckpt_path} does not fit this model and optimizer ({type(e).__name__}: "
                                  f"{e})") from None
    stage.mkdir(parents=True, exist_ok=True)
    metrics_path = stage / "metrics.jsonl"
    evaluated = set()  # steps whose val evaluation metrics.jsonl holds (a resumed finished run: not again)
    if d.main:
        evaluated = _truncate_metrics(metrics_path, step)
        if not args.resume:  # config.json before the first checkpoint: a checkpoint always has its config
            for stale in (ckpt_path, stage / "model.safetensors"):  # --overwrite: the old run's model is another
                stale.unlink(missing_ok=True)
            save_config(cfg, stage)  # the weights follow with the step-0 checkpoint below
    compiled = args.compile and _compile_works(d.device)
    train_model = parallel.wrap(torch.compile(model) if compiled else model, d)

    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * d.world
    flops_per_step = model.flops_per_token(args.seq_len) * tokens_per_step
    peak = measured_peak_flops(d.device, args.dtype) * d.world
    log = print if d.main else (lambda *a, **k: None)
    log(f"model: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(active=True) / 1e6:.2f}M active), "
        f"train {meta['train']['tokens']:,} tokens, val {meta['val']['tokens']:,} tokens, "
        f"{tokens_per_step:,} tokens/step, peak {peak / 1e12:.2f} TFLOP/s ({args.dtype})")

    def progress() -> float:
        p = []
        if args.max_steps:
            p.append(step / args.max_steps)
        if args.time_budget:
            p.append(train_time / args.time_budget)
        return max(p)

    def evaluate() -> dict:
        toks = val_tokens[: args.eval_tokens] if args.eval_tokens else val_tokens
        n_bytes, n_chars = meta["val"]["bytes"], meta["val"]["chars"]
        if len(toks) < len(val_tokens):  # a capped evaluation: the bytes and characters of the tokens it scores
            n_bytes, n_chars = tok.text_size(toks)
        r = bits_per_byte(model, toks, n_bytes, n_chars, args.seq_len, tok.bos_id, d.device, args.dtype, d.rank,
                          d.world, lambda t: parallel.all_reduce(t, d), batch=args.batch_size)
        return {"step": step, "time": round(train_time, 3), "tokens": tokens_seen, **r}

    def save() -> None:
        def write():
            info = {"step": step, "train_time": train_time, "tokens": tokens_seen, "loader": loader.state_dict(),
                    "world": d.world, "tokenizer_sha": tokenizer_fingerprint(tok),
                    "data_sha": meta["train"].get("sha256"), "args": _jsonable(vars(args))}
            try:
                save_training_state(ckpt_path, model, opt.state_dict(), info)
            except CheckpointError as e:
                raise UserError(f"{e}; the previous checkpoint in {stage} is intact") from None
            try:
                save_model(model, stage)
            except CheckpointError as e:
                raise UserError(f"{e}; {ckpt_path} was saved (--resume continues from it), model.safetensors is "
                                "the previous one") from None

        parallel.on_main(d, write, f"save the checkpoint in {stage}; the previous one is intact")

    if not args.resume:  # a run killed before its first periodic checkpoint resumes from step 0 (make demo does)
        save()

    def record(entry: dict) -> None:
        if d.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    history = []
    stop = {"signal": None, "at": 0.0}

    def on_signal(signum, _frame):
        """The first SIGINT/SIGTERM lets the current step finish, then the run saves and stops; a second one
        stops at once, without saving (the last checkpoint stays). A repeat within REPEAT_WINDOW is the same
        request: torchrun passes the terminal's Ctrl-C on to workers that already had it, as Slurm does a SIGTERM.
        (The window runs from when Python handles the first one, which a long native call can delay.)"""
        if stop["signal"] is not None:
            if time.monotonic() - stop["at"] < REPEAT_WINDOW:
                return
            raise UserError(f"stopped by a second {signal.Signals(signum).name} before saving; the last checkpoint "
                            f"in {stage} is kept")
        stop["signal"], stop["at"] = signum, time.monotonic()
        log(f"{signal.Signals(signum).name}: finishing step {step + 1}, then saving (again to stop without saving)")

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    window_time, window_tokens = 0.0, 0  # training time only: evaluations and saves do not count
    model.train()
    try:
        stopping = False
        while progress() < 1 and not stopping:
            t0 = time.perf_counter()
            scale = lr_scale(progress(), args.schedule, args.warmup, args.decay, args.min_lr_ratio)
            opt.set_lr(scale)
            losses = torch.zeros(3)
            for micro in range(args.grad_accum):
                x, y = loader.next_batch()
                x, y = x.to(d.device), y.to(d.device)
                sync = micro == args.grad_accum - 1 or d.world == 1
                ctx = contextlib.nullcontext() if sync else train_model.no_sync()
                with ctx:
                    with autocast(d.device, args.dtype):
                        out = train_model(x, y)
                    (out.loss / args.grad_accum).backward()
                losses += torch.tensor([out.loss.item(), out.lm_loss.item(),
                                        out.mtp_loss.item() if out.mtp_loss is not None else math.nan])
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else 1e30))
            for what, value in (("loss", float(losses[0])), ("gradient norm", grad_norm)):
                if not math.isfinite(value):  # stop before the update: the weights stay finite
                    raise UserError(f"{what} became {value} at step {step + 1}: lower --lr/--muon-lr (the last "
                                    f"checkpoint in {stage} is kept)")
            opt.step()
            opt.zero_grad()
            parallel.sync_expert_load(model, d)
            load_stats = model.update_expert_bias()
            step += 1
            tokens_seen += tokens_per_step
            # every rank takes the slowest rank's time (the schedule and the time budget follow it) and stops
            # after the same step when any rank was signalled
            dt, stopping = parallel.max_over_ranks([time.perf_counter() - t0, stop["signal"] is not None], d)
            if stopping and stop["signal"] is None:
                stop["signal"], stop["at"] = signal.SIGTERM, time.monotonic()  # another rank was signalled
            train_time += dt
            window_time += dt
            window_tokens += tokens_per_step
            if step % args.log_every == 0 or progress() >= 1:
                loss, lm_loss, mtp_loss = (parallel.mean(v / args.grad_accum, d) for v in losses.tolist())
                tps = window_tokens / window_time
                mfu = flops_per_step * (window_tokens / tokens_per_step) / window_time / peak
                window_time, window_tokens = 0.0, 0
                entry = {"step": step, "time": round(train_time, 3), "tokens": tokens_seen, "loss": loss,
                         "lm_loss": lm_loss, "lr_scale": scale, **opt.rates(), "grad_norm": grad_norm,
                         "tokens_per_s": tps, "mfu": mfu, **load_stats}
                if not math.isnan(mtp_loss):
                    entry["mtp_loss"] = mtp_loss
                record(entry)
                eta = train_time / max(progress(), 1e-9) - train_time
                log(f"step {step:5d} | loss {lm_loss:.4f} | {tps / 1e3:6.1f}k tok/s | MFU {mfu * 100:4.1f}% | "
                    f"lr x{entry['lr_scale']:.2f} | ETA {fmt_time(eta)}")
            if args.eval_every and step % args.eval_every == 0 and progress() < 1:
                r = evaluate()
                history.append(r)
                record(r)
                log(f"step {step:5d} | val loss {r['val_loss']:.4f} | val bpb {r['val_bpb']:.4f}")
            if args.save_every and step % args.save_every == 0 and progress() < 1 and not stopping:
                save()
        save()
    finally:
        if stop["signal"] is not None:  # a repeat may still be on its way: the default handler would kill us
            time.sleep(max(0.0, stop["at"] + REPEAT_WINDOW - time.monotonic()))
        for s, h in handlers.items():
            signal.signal(s, h)
    if stop["signal"]:
        log(f"stopped by {signal.Signals(stop['signal']).name} at step {step}; resume with --resume")
        parallel.shutdown(d)
        return model, {"step": step, "interrupted": True, "signal": int(stop["signal"])}
    r = evaluate()
    history.append(r)
    if step not in evaluated:
        record(r)
    log(f"done: {step} steps, {fmt_time(train_time)} training | val loss {r['val_loss']:.4f} | "
        f"val bpb {r['val_bpb']:.4f} | saved {stage}")
    parallel.shutdown(d)
    return model, {"step": step, "train_time": train_time, "tokens": tokens_seen, "evals": history, **r}


REPEAT_WINDOW = 2.0
"""Seconds after a first SIGINT/SIGTERM during which the same signal again is taken as a duplicate."""

RESUME_FIXED = ("data", "text_field", "val_fraction", "seq_len", "batch_size", "grad_accum", "optimizer")
"""Arguments a resumed run must keep: they define the data and the meaning of the saved data position, or the
optimizer state's layout."""


def _check_resume_arguments(args, saved: dict) -> None:
    for name in RESUME_FIXED:
        if name == "data" and _same_files(args.data, saved.get("data")):  # (however spelt: ~/texts/, ~/texts)
            continue
        if name in saved and getattr(args, name) != saved[name]:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"--resume: {flag} is {_shown(getattr(args, name))} but the run was started with "
                            f"{_shown(saved[name])}; resume with the same value")


def _shown(value) -> str:
    """An argument's value in a message: paths as given, no --data as the built-in corpus."""
    return " ".join(value) if isinstance(value, list) else "the built-in corpus" if value is None else repr(value)


def _same_files(a: list[str] | None, b: list[str] | None) -> bool:
    """Whether two --data values name the same corpus files (both None: the built-in corpus)."""
    if a is None or b is None:
        return a == b
    try:
        return corpus_files(a) == corpus_files(b)  # (real paths: however each spells them)
    except UserError:  # one of them names missing files
        return False


def _compile_works(device: str) -> bool:
    """torch.compile needs a compiler (on CPU a C++ one, for inductor's kernels): tried on a tiny function before
    training, so that a machine without one trains eagerly, saying why, instead of failing at the first step."""
    try:
        torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(4, device=device))
        return True
    except Exception as e:  # noqa: BLE001 - whatever inductor raises (InvalidCxxCompiler, CalledProcessError, ...)
        print(f"nanoseek: torch.compile does not work here ({first_line(e)}); training without it", file=sys.stderr)
        return False


TOKENIZER_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
"""Config fields a new run takes from its tokenizer, whatever --preset/--config/--set say."""


def _check_resume_config(args, cfg: ModelConfig) -> None:
    """A resumed run keeps its own model (config.json). --preset/--config/--set given with --resume must describe
    that same model (the command that started the run, repeated), or the run is refused rather than their
    request silently ignored."""
    if not (args.preset or args.config or args.set):
        return
    asked, have = model_config(args).to_dict(), cfg.to_dict()
    diff = [k for k in asked if k not in TOKENIZER_FIELDS and asked[k] != have.get(k)]
    if diff:
        shown = ", ".join(f"{k}={asked[k]!r} (the run has {have.get(k)!r})" for k in diff[:3])
        raise UserError(f"--resume continues the run's own model, but --preset/--config/--set ask for another: "
                        f"{shown}{' ...' if len(diff) > 3 else ''}; drop them, or start again with --overwrite")


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def _truncate_metrics(path: Path, step: int) -> set[int]:
    """Keep the entries logged up to the checkpoint's step (later ones will be logged again; a line cut short by a
    crash is dropped); returns the steps with a val evaluation among them."""
    keep, evaluated = [], set()
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
            keep.append(line)
            if "val_loss" in entry:
                evaluated.add(entry["step"])
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    return evaluated
