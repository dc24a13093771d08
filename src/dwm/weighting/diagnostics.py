"""What the weighter logs about itself: statistics of a batch's weights (every step), and with
weighting.advanced.diagnostics how much of a fresh hypergradient phi captures and how noisy it is (every stage
start)."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from dwm.weighting.probe import BilevelProbe

log = logging.getLogger(__name__)


def weight_stats(w: torch.Tensor, domain_ids: torch.Tensor, domains: list[str]) -> dict[str, float]:
    """Entropy of w/B (normalised by log B: 1 = uniform), effective sample size (sum w)^2 / sum w^2, min, max and
    the mean weight of each domain present in the batch."""
    w = w.detach().double().cpu()
    B = w.numel()
    p = w / w.sum()
    ent = float(-(p * torch.log(p.clamp_min(1e-300))).sum())
    out = {"w_entropy": ent / math.log(B) if B > 1 else 1.0, "w_ess": float(w.sum() ** 2 / (w * w).sum()),
           "w_min": float(w.min()), "w_max": float(w.max())}
    d = domain_ids.detach().cpu()
    for i in torch.unique(d).tolist():
        out[f"w_domain/{domains[i]}"] = float(w[d == i].mean())
        out[f"share/{domains[i]}"] = float(w[d == i].sum() / w.sum())  # how much of the step the domain is
    return out


def rank(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their average rank (so constant scores have no correlation with anything)."""
    _, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(cnt) - (cnt + 1) / 2)[inv]


def corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; nan for fewer than 2 values or a constant side."""
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


class EssWatch:
    """Counts the batches whose effective sample size is below `min_fraction` of the batch, and warns on the
    first and every 100th."""

    def __init__(self, min_fraction: float):
        self.min_fraction, self.count = min_fraction, 0

    def check(self, ess: float, B: int) -> None:
        if ess < self.min_fraction * B:
            self.count += 1
            if self.count == 1 or self.count % 100 == 0:
                log.warning("DWM: effective sample size %.1f of a batch of %d (below %.0f%%; warning %d)",
                            ess, B, 100 * self.min_fraction, self.count)


class Diagnostics:
    """Fresh dL/dw of a fixed set of held-back training samples (`ids`, never used to train phi) under two
    independent reference batches. Logs the correlation of the two (reference-side noise), the Spearman
    correlation of phi's scores with -dL/dw (capture; before and after the stage's updates), the share of the
    signal's variance that the domain explains, and the mean signal per domain."""

    def __init__(self, probe: BilevelProbe, ids: np.ndarray, domains: list[str]):
        self.probe, self.ids, self.domains = probe, ids, domains
        self.signal: tuple[np.ndarray, np.ndarray] | None = None

    def run(self, ctx: Any, when: str, rng: np.random.Generator, lookahead_lr: float, stage: int) -> None:
        if when == "before" or self.signal is None:
            a, _ = self.probe.measure(ctx, self.ids, self.probe.ref_batch(rng), lookahead_lr)
            b, _ = self.probe.measure(ctx, self.ids, self.probe.ref_batch(rng), lookahead_lr)
            self.signal = (a.numpy(), b.numpy())
        a, b = self.signal
        sig = -(a + b) / 2
        scores = self.probe.scorer.score_ids(ctx.data, self.ids, ctx.model)
        dom = ctx.data.domain_ids[self.ids]
        means = {self.domains[d]: float(sig[dom == d].mean() / (np.abs(sig).mean() + 1e-300))
                 for d in np.unique(dom)}
        between = np.var([sig[dom == d].mean() for d in dom])
        ctx.log({"event": "diagnose", "when": when, "stage": stage, "ref_noise_corr": corr(a, b),
                 "capture_spearman": corr(rank(scores), rank(sig)),
                 "domain_r2": float(between / max(np.var(sig), 1e-300)), "signal_by_domain": means})
