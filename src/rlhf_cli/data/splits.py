"""Held-out splits that do not depend on the order rows arrive in beyond the seed."""

from __future__ import annotations

import random


def holdout(rows: list, fraction: float, max_rows: int, seed: int) -> tuple[list, list]:
    """Deterministically move round(fraction * n) rows (at most max_rows, at least 1 when fraction > 0 and n > 1)
    to a held-out list, chosen by a seeded shuffle; the training rows keep their original order."""
    n = len(rows)
    k = min(max_rows, round(fraction * n)) if fraction > 0 else 0
    if fraction > 0 and n > 1:
        k = max(1, k)
    k = min(k, n - 1)
    if k <= 0:
        return list(rows), []
    picked = set(random.Random(seed).sample(range(n), k))
    train = [r for i, r in enumerate(rows) if i not in picked]
    held = [r for i, r in enumerate(rows) if i in picked]
    return train, held


def cycled(items: tuple | list, num: int, rng: random.Random) -> list:
    """`num` of `items` in `rng`'s shuffled order, a fresh shuffle each time all were used (a built-in task's
    prompt rows)."""
    out: list = []
    while len(out) < num:
        order = list(items)
        rng.shuffle(order)
        out.extend(order[: num - len(out)])
    return out
