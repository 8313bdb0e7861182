"""Tokenizer-independent evaluation: bits per byte (and per character) on a held-out split.

bpb = (sum over val tokens of -ln p(token)) / ln 2 / (UTF-8 bytes of the val text). Every val token is
scored exactly once (data.eval_windows), so the figure compares models with different tokenizers,
including nanoGPT's character model (bits per character on an ASCII text equals bits per byte). The <|bos|>
before each document after the first is scored too and has no bytes: predicting where a document ends is part of
the text's information (about 0.005 bits per byte on the default corpus; nanochat leaves such tokens out).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from nanoseek.data import eval_windows
from nanoseek.errors import UserError


def autocast(device: str, dtype: str):
    """bf16 autocast on CPU and CUDA (matmuls in bf16; router, norms and losses stay fp32)."""
    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def bits_per_byte(model, tokens: np.ndarray, n_bytes: int, n_chars: int, seq_len: int, bos_id: int,
                  device: str = "cpu", dtype: str = "fp32", rank: int = 0, world: int = 1,
                  all_reduce=None, batch: int = 1) -> dict:
    """Score every token of `tokens`, `batch` windows of seq_len per forward (batches strided over ranks; sums
    all-reduced when given)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # nats, tokens
    for i, (x, y) in enumerate(eval_windows(tokens, seq_len, bos_id, batch)):
        if i % world != rank:
            continue
        with autocast(device, dtype):
            logits = model(x.to(device))
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                              reduction="sum")
        sums += torch.tensor([nll.item(), y.numel()], dtype=torch.float64)
    if all_reduce is not None:
        all_reduce(sums)
    model.train(was_training)
    nats, count = sums.tolist()
    if not count or not n_bytes:
        raise UserError(f"the validation tokens ({len(tokens)}) hold no text to score: give more of them")
    return {"val_loss": nats / count, "val_bpb": nats / math.log(2) / n_bytes,
            "val_bpc": nats / math.log(2) / n_chars}
