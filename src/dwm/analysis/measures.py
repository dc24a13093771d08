"""The numbers of the analysis: rank correlations, the correlation ratio, bigram novelty and weight summaries.

All rank-based, so they do not depend on the scale of the weights (w = B softmax(s / tau)) or of a property:
- `spearman(x, y)`: Pearson correlation of the average ranks (ties share their rank), over the pairs where both
  are finite; NaN when fewer than 3 pairs remain or either side is constant (`no_correlation` says which, in
  words, for the report: a property every sample shares, such as the length of fully packed rows, has no
  correlation with anything, and is shown so rather than as NaN).
- `correlation_ratio(groups, y)`: eta of y's ranks by group, sqrt(between-group / total variance of the ranks):
  0 = the group says nothing about y's order, 1 = the group fixes it. Unsigned; eta^2 * (n - 1) is the
  Kruskal-Wallis H statistic. `one_vs_rest` gives the signed view: Spearman of y with [group == g] per group.
- `group_means(groups, y)`: mean, standard error and count of y per group (the hypergradient signal per domain).
- `bigram_novelty(rows, n_tokens)`: the diversity of each sample within its set: the share of the sample's
  distinct token bigrams that occur in no other sample of the set (1 = nothing of it seen elsewhere, 0 = every
  bigram of it also appears elsewhere). A bag-of-tokens centroid distance was the alternative; novelty is
  preferred because frequent function tokens, which dominate any token histogram, cancel out of it.
"""

from __future__ import annotations

import math

import numpy as np


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks 0..n-1 (ties share their mean rank)."""
    _, inv, cnt = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    return (np.cumsum(cnt) - (cnt + 1) / 2)[inv.reshape(-1)]


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(Spearman rho, number of finite pairs used)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3:
        return math.nan, n
    rx, ry = ranks(x[ok]), ranks(y[ok])
    if rx.std() == 0 or ry.std() == 0:
        return math.nan, n
    return float(np.corrcoef(rx, ry)[0, 1]), n


def no_correlation(x: np.ndarray, y: np.ndarray, x_name: str = "weights") -> str | None:
    """Why spearman(x, y) is NaN, in words for the report; None when it is defined. `x_name`: what x is (the
    weights), named when x is the constant side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return f"{int(ok.sum())} samples: no correlation"
    if np.ptp(y[ok]) == 0:
        return "constant: no correlation"
    if np.ptp(x[ok]) == 0:
        return f"constant {x_name}: no correlation"
    return None


def correlation_ratio(groups: np.ndarray, y: np.ndarray) -> float:
    """eta of y's ranks by group (see the module docstring)."""
    y = np.asarray(y, np.float64)
    groups = np.asarray(groups)
    if len(y) < 3:
        return math.nan
    r = ranks(y)
    total = ((r - r.mean()) ** 2).sum()
    if total == 0:
        return math.nan
    between = sum(len(r[groups == g]) * (r[groups == g].mean() - r.mean()) ** 2 for g in np.unique(groups))
    return float(math.sqrt(between / total))


def one_vs_rest(groups: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Spearman of y with the indicator [group == g], for each group g (positive: g's samples rank higher)."""
    groups = np.asarray(groups)
    return {str(g): spearman((groups == g).astype(np.float64), y)[0] for g in np.unique(groups)}


def bigram_novelty(rows: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """Per sample: share of its distinct token bigrams found in no other sample of `rows` (see module docstring);
    NaN for a sample with fewer than 2 real tokens."""
    rows = np.asarray(rows, np.int64)
    n_tokens = np.asarray(n_tokens, np.int64)
    base = int(rows.max()) + 1 if rows.size else 1
    keys, owner = [], []
    for i, (row, n) in enumerate(zip(rows, n_tokens)):
        t = row[:n]
        k = np.unique(t[:-1] * base + t[1:]) if n >= 2 else np.zeros(0, np.int64)
        keys.append(k)
        owner.append(np.full(len(k), i))
    out = np.full(len(rows), math.nan)
    if not keys:
        return out
    allk, own = np.concatenate(keys), np.concatenate(owner)
    if not len(allk):
        return out
    _, inv, cnt = np.unique(allk, return_inverse=True, return_counts=True)  # a sample's keys are distinct
    unique_to_owner = cnt[inv] == 1
    n_keys = np.bincount(own, minlength=len(rows))
    n_novel = np.bincount(own, weights=unique_to_owner, minlength=len(rows))
    has = n_keys > 0
    out[has] = n_novel[has] / n_keys[has]
    return out


def weight_summary(w: np.ndarray) -> dict[str, float]:
    """n, mean, quantiles, effective sample size as a fraction of n ((sum w)^2 / (n sum w^2)) and the entropy of
    w / sum w normalised by log n (1 = uniform)."""
    w = np.asarray(w, np.float64)
    n = len(w)
    q = np.quantile(w, [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1]) if n else [math.nan] * 7
    p = w / w.sum() if n and w.sum() > 0 else np.full(n, math.nan)
    ent = float(-(p * np.log(np.clip(p, 1e-300, None))).sum() / math.log(n)) if n > 1 else math.nan
    return {"n": float(n), "mean": float(w.mean()) if n else math.nan,
            "min": float(q[0]), "p10": float(q[1]), "p25": float(q[2]), "median": float(q[3]),
            "p75": float(q[4]), "p90": float(q[5]), "max": float(q[6]),
            "ess_fraction": float(w.sum() ** 2 / (n * (w * w).sum())) if n and (w * w).sum() > 0 else math.nan,
            "entropy": ent}


def group_means(groups: np.ndarray, y: np.ndarray) -> dict[str, dict[str, float]]:
    """Per group: mean of y, its standard error (NaN for a single sample) and the count."""
    groups, y = np.asarray(groups), np.asarray(y, np.float64)
    out = {}
    for g in np.unique(groups):
        v = y[groups == g]
        se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
        out[str(g)] = {"mean": float(v.mean()), "se": se, "n": len(v)}
    return out
