"""Shared test data: a small synthetic corpus, made here (tests never read the network)."""

import random

WORDS = ("the king queen said to of and a my lord good night day love death heart war peace sword "
         "crown men women come go speak hear see 3 7 12 + - = answer question").split()


def corpus_text(n_lines: int = 1500, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = rng.choices(WORDS, k=rng.randint(4, 12))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    return "\n".join(lines) + "\n"
