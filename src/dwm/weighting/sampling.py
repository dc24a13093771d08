"""Drawing a batch in proportion to the weights: n draws from N candidates whose expected counts are n * p_i.

Weighting a batch by w (the LM minimises sum_i w_i l_i / B) and drawing the batch so that candidate i is trained
n * p_i times in expectation (p = w / sum w) give the same expected gradient. A draw *without* replacement cannot
do this when some n * p_i > 1: its inclusion probabilities are capped at 1 and the realised mixture is flatter than
w (Gumbel top-k, `gumbel_topk`, is such a draw). Two draws that keep the expectation:

- `systematic` (default): Madow's systematic sampling. The candidates in a random order lay out intervals of
  length n * p_i on [0, n); the points u, u + 1, ..., u + n - 1 (u uniform in [0, 1)) pick the intervals they fall
  in. Candidate i is drawn floor(n p_i) or ceil(n p_i) times, expected n * p_i exactly, so a sample whose weight asks
  for more than one copy gets it, and the batch varies far less than with independent draws.
- `multinomial`: n independent draws with replacement, expected n * p_i, more variance.
`gumbel_topk` is kept for comparison; its inclusion probabilities are not proportional to p.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

DRAWS = ("systematic", "multinomial", "gumbel")
Draw = Literal["systematic", "multinomial", "gumbel"]


def _probabilities(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or len(p) == 0 or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError("weights must be a non-empty vector of finite, non-negative numbers with a positive sum")
    return p / p.sum()


def systematic(p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n candidate indices (sorted, repeats allowed) with expected counts n * p_i (see the module docstring)."""
    p = _probabilities(p)
    order = rng.permutation(len(p))
    edges = np.cumsum(n * p[order])
    edges[-1] = n  # no point may fall past the last interval through rounding
    points = rng.random() + np.arange(n)
    return np.sort(order[np.searchsorted(edges, points, side="right")])


def multinomial(p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n independent draws with probability p, sorted."""
    return np.sort(rng.choice(len(p), size=n, replace=True, p=_probabilities(p)))


def gumbel_topk(p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct candidates by Gumbel top-k on log p: a draw without replacement (inclusion capped at 1), sorted."""
    keys = np.log(np.clip(_probabilities(p), 1e-300, None)) + rng.gumbel(size=len(p))
    return np.sort(np.argsort(-keys, kind="stable")[:n])


def draw(p: np.ndarray, n: int, rng: np.random.Generator, how: Draw = "systematic") -> np.ndarray:
    """n candidate indices drawn in proportion to p by `how` (systematic, multinomial or gumbel)."""
    if how == "systematic":
        return systematic(p, n, rng)
    if how == "multinomial":
        return multinomial(p, n, rng)
    if how == "gumbel":
        return gumbel_topk(p, n, rng)
    raise ValueError(f"draw must be one of {DRAWS}, got {how!r}")


def stream_coverage(pool: int, steps: int, batch: int, candidates: float) -> dict[str, float]:
    """What streaming `candidates` x the budget from a fixed pool of `pool` samples means with flat scores (each
    candidate drawn with probability 1 / candidates): how often the stream passes over the pool, and the expected
    numbers of samples never trained and trained twice or more. A sample is offered floor(a) or ceil(a) times
    (a = passes) and trained Binomial(offers, 1 / candidates) times; uniform training of steps x batch <= pool
    samples trains each at most once."""
    a = steps * batch * candidates / pool
    q = 1.0 / candidates
    lo = int(np.floor(a))
    frac = a - lo
    never = twice = 0.0
    for k, share in ((lo, 1.0 - frac), (lo + 1, frac)):
        p0 = (1.0 - q) ** k
        p1 = k * q * (1.0 - q) ** (k - 1) if k else 0.0
        never += share * p0
        twice += share * (1.0 - p0 - p1)
    return {"passes": a, "expected_trainings": steps * batch / pool, "never": pool * never,
            "twice_or_more": pool * twice}
