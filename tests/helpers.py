"""Shared test data: a small synthetic corpus, made here (tests never read the network); a full disk."""

import random
import resource
import signal

WORDS = ("the king queen said to of and a my lord good night day love death heart war peace sword "
         "crown men women come go speak hear see 3 7 12 + - = answer question").split()


def corpus_text(n_lines: int = 1500, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = rng.choices(WORDS, k=rng.randint(4, 12))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    return "\n".join(lines) + "\n"


def peak_attention(model):
    """Scale the attention input projections up so that the scores are of order 1: at init they are ~0, and
    position, causality or the softmax scale would hardly show in the outputs. Returns the model."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "q_b_proj.weight", "k_proj.weight", "kv_a_proj_with_mqa.weight")):
                p.mul_(10)
    return model


def full_disk() -> None:
    """A subprocess's preexec_fn: its writes past 64 KB fail with EFBIG, as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
