"""The resampling selector ("dwm"; weighting.apply = "resample"): every step's batch is G samples drawn from the
next `candidates` x G of the data stream by phi's current scores, p = softmax(s / tau) over the candidates (mixed
with the uniform floor), and trained at weight 1. How (weighting.advanced.draw):
- 'gumbel' (default, the measured one): G distinct candidates by Gumbel top-k on log p. A candidate is drawn at
  most once, so where G * p_i > 1 its inclusion is capped and the trained mixture is flatter than p: this is not
  the in-batch weighting's expected gradient.
- 'systematic': expected counts G * p_i exactly (dwm.nn.sampling.systematic), repeats where p asks for them, so
  the expected gradient is that of weighting the candidates by G * p.
Drawing keeps every sample of the step at weight 1 (no loss of effective batch size, which at small batches costs
more than the weighting gains), and a candidate left out costs only phi's forward. The stream is `candidates` x
the budget long: on a fixed selection smaller than that it wraps, and the selector says so in one warning line
before step 0 (how many samples flat scores would leave unseen or train twice). It holds the same `Scorer` as the weighter that learns phi (the run wires the two:
dwm.run.build_selector), and its own seeded generator, which is part of the checkpoint."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from dwm.nn.sampling import draw, stream_coverage
from dwm.train.context import TrainContext
from dwm.train.selector import OnlineSelector, SelectorConfig
from dwm.weighting.config import WeightingConfig
from dwm.weighting.scorer import Scorer

log = logging.getLogger(__name__)


class ResampleSelector(OnlineSelector):
    """Draws each batch by phi's scores (see the module docstring)."""

    name = "dwm"
    config_section = "weighting"  # its candidates ratio is weighting.candidates
    uses_scorer = True  # constructed with the weighter's scorer
    log_selections = False  # one per step: the weighter logs the batch's domain shares instead
    what = "weighting.apply = resample"  # what draws the batches, for the coverage warning

    def __init__(self, cfg: SelectorConfig | None = None, weighting: WeightingConfig | None = None, *,
                 scorer: Scorer):
        w = weighting or WeightingConfig()
        super().__init__(SelectorConfig(mode="dwm", every=1, candidates=w.candidates))
        self.scorer, self.how = scorer, w.advanced.draw

    def attach(self, ctx: TrainContext) -> None:
        super().attach(ctx)
        self.rng = np.random.default_rng([ctx.seed, 0x5E1])
        cov = stream_coverage(len(ctx.pool), ctx.total_steps, self.G, self.cfg.candidates)
        if cov["passes"] > 1:
            msg = (f"{self.what} streams {self.cfg.candidates:g} x the budget from {len(ctx.pool):,} "
                   f"samples: {cov['passes']:.1f} passes over them; with flat scores ~{cov['never']:,.0f} samples "
                   f"({cov['never'] / len(ctx.pool):.0%}) would never be trained and ~{cov['twice_or_more']:,.0f} "
                   f"({cov['twice_or_more'] / len(ctx.pool):.0%}) twice or more")
            log.warning(msg)
            ctx.log({"event": "resample_coverage", **cov})

    def score(self, ctx: TrainContext, ids: np.ndarray) -> np.ndarray:
        return self.scorer.score_ids(ctx.data, ids, ctx.model).astype(np.float64)

    def keep(self, ctx: TrainContext, ids: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
        p = self.scorer.weights(torch.from_numpy(scores)).numpy() / len(scores)
        return ids[draw(p, n, self.rng, self.how)]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state:
            self.rng.bit_generator.state = state["rng"]
