"""Drawing without replacement by scores: the Gumbel top-k trick, shared by the resampling selector, the online
selectors and `dwm select` (numpy only)."""

from __future__ import annotations

import numpy as np


def top_k(keys: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest keys (ties: the earlier first), in increasing index order (stream order)."""
    return np.sort(np.argsort(-np.asarray(keys), kind="stable")[:n])


def gumbel_keys(scores: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """scores / temperature + Gumbel(0, 1) noise: sorting by these keys draws without replacement with
    probability proportional to exp(score / temperature). temperature 0: the scores themselves (no draw)."""
    scores = np.asarray(scores, dtype=np.float64)
    if temperature <= 0:
        return scores.copy()
    return scores / temperature + rng.gumbel(size=len(scores))


def gumbel_top_k(scores: np.ndarray, n: int, rng: np.random.Generator, temperature: float = 1.0) -> np.ndarray:
    """n indices drawn without replacement with probability proportional to exp(score / temperature), in
    increasing index order (temperature 0: the deterministic top n)."""
    return top_k(gumbel_keys(scores, temperature, rng), n)
