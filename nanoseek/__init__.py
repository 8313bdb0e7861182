"""nanoseek: the DeepSeek-V3 architecture in miniature (tokenizer, pretraining, inference engine, server).

    import nanoseek
    model, tokenizer = nanoseek.load("runs/demo")      # a run, a checkpoint or a transformers directory
    logits = model(input_ids)                          # [batch, seq, vocab]
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

STAGES = ("rl", "sft", "base")  # newest first: load() of a run directory takes the most trained model


def resolve(path: str | Path) -> tuple[Path, Path | None]:
    """(model directory, tokenizer directory or None) for a run, stage or transformers directory."""
    from nanoseek.errors import UserError

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist")
    if p.is_file():
        raise UserError(f"{p} is a file: give the directory that holds it (a run, a checkpoint or a transformers "
                        "directory)")
    model_dir = p
    if not (p / "config.json").exists():
        stages = [p / s for s in STAGES if (p / s / "config.json").exists()]
        if not stages:
            raise UserError(f"{p} holds no model (no config.json, and no {'/'.join(STAGES)} stage directory)")
        model_dir = stages[0]
    for cand in (model_dir, model_dir / "tokenizer", model_dir.parent / "tokenizer"):
        if (cand / "tokenizer.json").exists():
            return model_dir, cand
    return model_dir, None


def load(path: str | Path, device: str = "cpu"):
    """Load (model, tokenizer) from a run directory (its newest stage), a checkpoint directory, or a
    transformers DeepseekV3 directory. tokenizer is None when there is no tokenizer.json."""
    from nanoseek.checkpoint import MODEL_TYPE, load_model, read_config
    from nanoseek.hf import import_dir
    from nanoseek.tokenizer import Tokenizer

    model_dir, tok_dir = resolve(path)
    if read_config(model_dir / "config.json").get("model_type") == MODEL_TYPE:
        model = load_model(model_dir, device)
    else:
        model = import_dir(model_dir, device)
    tokenizer = Tokenizer.load(tok_dir) if tok_dir else None
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        from nanoseek.errors import UserError

        raise UserError(f"tokenizer in {tok_dir} has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size}: they do not belong together")
    return model, tokenizer
