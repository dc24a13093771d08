"""Hand-set per-domain weights within each batch (`weighting.mode = "domains"`): the in-batch counterpart of a static
mixture, and the DWM benchmark's in-batch oracle.

A sample of domain d gets the raw weight v_d (`weighting.domain_weights`, e.g. "books=2"; unnamed domains 1); the
weights are normalised over the (global) batch so that they sum to its size, as the learned weighting's
w = B softmax(s / tau) does. So "books=2" is what a DWM that learned s_books - s_other = tau ln 2 would do, on the
same data stream as uniform training: it measures how much in-batch weighting toward a domain can gain at a
budget, apart from how well phi learns it (docs/DECISIONS.md). Weighting every domain by the same v is uniform.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from dwm.config import did_you_mean
from dwm.data.batch import Batch
from dwm.data.mixture import parse_shares
from dwm.errors import UserError
from dwm.train.context import TrainContext
from dwm.train.distributed import is_dist
from dwm.train.weighter import Weighter
from dwm.weighting.config import WeightingConfig


def parse_domain_weights(spec: str, domains: list[str]) -> np.ndarray:
    """"books=2,code=0.5" -> a raw weight per domain of `domains` (1 for the unnamed); one-line errors for an
    unknown domain (with a did-you-mean hint) or a weight that is not positive."""
    try:
        named = parse_shares(spec)
    except UserError:
        raise UserError(f"config key weighting.domain_weights: expected domain=weight pairs (e.g. books=2), got "
                        f"{spec!r}") from None
    if not named:
        raise UserError("config key weighting.domain_weights: empty; expected domain=weight pairs, e.g. books=2")
    for d, v in named.items():
        if d not in domains:
            raise UserError(f"config key weighting.domain_weights: unknown domain {d!r}{did_you_mean(d, domains)} "
                            f"(have: {', '.join(domains)})")
        if not v > 0:
            raise UserError(f"config key weighting.domain_weights: the weight of {d} must be > 0, got {v}")
    return np.array([named.get(d, 1.0) for d in domains], dtype=np.float64)


class DomainWeighter(Weighter):
    """w_i = B v_{d(i)} / sum_j v_{d(j)} over the global batch."""

    name = "domains"

    def __init__(self, cfg: WeightingConfig | None = None):
        self.cfg = cfg or WeightingConfig(mode="domains")
        self.v: torch.Tensor | None = None
        self._last: dict[str, float] = {}

    def attach(self, ctx: TrainContext) -> None:
        self.v = torch.from_numpy(parse_domain_weights(self.cfg.domain_weights, list(ctx.data.domains))).float()
        ctx.log({"event": "domain_weights", **{d: float(x) for d, x in zip(ctx.data.domains, self.v, strict=True)}})

    def weights(self, batch: Batch, losses: torch.Tensor | None = None) -> torch.Tensor:
        assert self.v is not None, "attach() first"
        raw = self.v.to(batch.input_ids.device)[batch.domain_ids]
        total = torch.stack([raw.sum(), torch.tensor(float(len(raw)), device=raw.device)])
        if is_dist():
            dist.all_reduce(total)  # normalise over the global batch, as the contract asks
        w = raw * (total[1] / total[0])
        self._last = {"w_min": float(w.min()), "w_max": float(w.max())}
        return w.float()

    def step_metrics(self) -> dict[str, float]:
        return dict(self._last)
