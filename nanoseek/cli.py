"""`nanoseek <verb>`: the user's vocabulary. Each verb lives in a module exposing
`add_arguments(parser)` and `run(args)`; bad input ends in one line on stderr and exit code 1."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# verb -> (module, one-line help). Modules are imported when the parser is built (argparse needs the flags).
VERBS = {
    "tokenizer": ("nanoseek.tokenizer", "train a byte-level BPE tokenizer on a corpus (<run>/tokenizer)"),
    "pretrain": ("nanoseek.pretrain", "pretrain a model on a corpus (<run>/base)"),
    "info": ("nanoseek.cli", "show a preset's or a checkpoint's config, parameters and FLOPs per token"),
    "export": ("nanoseek.cli", "write a transformers DeepseekV3ForCausalLM directory"),
    "import": ("nanoseek.cli", "read a transformers DeepseekV3 directory into a nanoseek checkpoint"),
    "generate": ("nanoseek.chat", "complete one prompt (streamed text, or --json with tokens and log-probs)"),
    "chat": ("nanoseek.chat", "chat with a model in the terminal (streaming, /system, /reset, /exit)"),
    "serve": ("nanoseek.server", "OpenAI-compatible HTTP server with continuous batching, and a web chat page"),
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--preset / --config / --set: how every verb that builds a model is configured."""
    p.add_argument("--preset", help="model preset: tiny, cpu, dense, gpu (default: cpu)")
    p.add_argument("--config", help="JSON file with ModelConfig fields (applied over the preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field (repeatable), e.g. --set num_hidden_layers=6")


def model_config(args):
    from nanoseek.config import ModelConfig, preset, read_fields

    cfg = preset(args.preset or "cpu")
    if args.config:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **read_fields(args.config)})
    return cfg.with_overrides(args.set)


def pick_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from nanoseek.errors import UserError

        raise UserError("--device cuda was asked for but no CUDA device is available")
    return name


# --- small verbs implemented here -----------------------------------------------------------------

def _info_arguments(p):
    p.add_argument("path", nargs="?", help="a checkpoint, run or transformers directory (else: the preset)")
    add_model_arguments(p)
    p.add_argument("--seq-len", type=int, default=256,
                   help="sequence length for the FLOPs estimate (default: pretrain's, 256)")


def _info(args):
    import json

    from nanoseek.model import NanoSeek

    if args.path:
        from nanoseek import load

        model, _ = load(args.path)
    else:
        model = NanoSeek(model_config(args))
    print(json.dumps(model.config.to_dict(), indent=2))
    print(f"parameters: {model.num_params() / 1e6:.2f}M total, {model.num_params(active=True) / 1e6:.2f}M active")
    print(f"training FLOPs per token at seq {args.seq_len}: {model.flops_per_token(args.seq_len) / 1e6:.1f}M")


def _export_arguments(p):
    p.add_argument("path", help="run or checkpoint directory to export")
    p.add_argument("--out", required=True, help="output directory (transformers format)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def _export(args):
    import torch

    from nanoseek import load, resolve
    from nanoseek.hf import export

    _check_out(args.out)
    model, _ = load(args.path)
    _, tok_dir = resolve(args.path)
    out = export(model, args.out, tok_dir, dtype=getattr(torch, args.dtype))
    L, mtp = model.config.num_hidden_layers, model.config.num_nextn_predict_layers
    layers = f"layer {L}" if mtp == 1 else f"layers {L}-{L + mtp - 1}"
    note = f"; it lists the MTP weights ({layers}) as UNEXPECTED and ignores them" if mtp else ""
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained{note})")


def _import_arguments(p):
    p.add_argument("path", help="transformers DeepseekV3 directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output nanoseek checkpoint directory")


def _check_out(out: str) -> None:
    """--out: a new or empty directory, or a model directory to replace (its config.json), never other files."""
    from nanoseek.errors import UserError

    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p} is a file")
    if p.is_dir() and any(p.iterdir()) and not (p / "config.json").exists():
        raise UserError(f"--out {p} holds other files (no config.json of a model it would replace): give a new "
                        "or empty directory")


def _import(args):
    from nanoseek import load
    from nanoseek.checkpoint import save_model

    _check_out(args.out)
    model, tokenizer = load(args.path)
    save_model(model, args.out)
    if tokenizer is not None:
        tokenizer.save(args.out)
    print(f"wrote {args.out} ({model.num_params() / 1e6:.2f}M parameters)")


LOCAL = {"info": (_info_arguments, _info), "export": (_export_arguments, _export),
         "import": (_import_arguments, _import)}


def build_parser() -> argparse.ArgumentParser:
    from nanoseek import __version__

    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 in miniature: tokenizer, pretraining, "
                                     "inference, chat, an OpenAI-compatible server.")
    parser.add_argument("--version", action="version", version=f"nanoseek {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb in LOCAL:
            add, run = LOCAL[verb]
        else:
            mod = importlib.import_module(module)
            # a module holding several verbs names them add_<verb>_arguments / run_<verb>
            add = getattr(mod, f"add_{verb}_arguments", None) or mod.add_arguments
            run = getattr(mod, f"run_{verb}", None) or mod.run
        add(p)
        _show_defaults(p)
        p.set_defaults(_run=run)
    return parser


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """--help gives every option's default value, where its help text does not already."""
    for a in p._actions:
        if a.option_strings and a.default not in (None, False, argparse.SUPPRESS) and "default" not in (a.help or ""):
            a.help = f"{a.help} (default: %(default)s)" if a.help else "default: %(default)s"


def main(argv: list[str] | None = None) -> int:
    from nanoseek.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        result = args._run(args)
    except UserError as e:
        print(f"nanoseek {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a path that is a file, a directory we may not write, a full disk
        print(f"nanoseek {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError:  # e.g. one .txt file (one document, read whole) larger than memory
        print(f"nanoseek {args.verb}: error: out of memory (a corpus .txt file is read whole: split a huge one into "
              "several files, or into the lines of a .jsonl; a smaller --batch-size or model)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nanoseek {args.verb}: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
