"""The resampling selector ("dwm"; weighting.apply = "resample"): every step's batch is G samples drawn from the
next `candidates` x G of the data stream with probability softmax(s / tau) (mixed with the uniform floor),
without replacement (Gumbel top-k), by phi's current scores. Weighting a uniform batch by w and drawing the batch
in proportion to w have the same expected gradient; drawing keeps every sample of the step at weight 1 (no loss
of effective batch size, which at small batches costs more than the weighting gains), and a candidate left out
costs only phi's forward. It holds the same `Scorer` as the weighter that learns phi (the run wires the two:
dwm.run.build_selector), and its own seeded generator, which is part of the checkpoint."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dwm.nn.sampling import gumbel_top_k
from dwm.train.context import TrainContext
from dwm.train.selector import OnlineSelector, SelectorConfig
from dwm.weighting.config import WeightingConfig
from dwm.weighting.scorer import Scorer


class ResampleSelector(OnlineSelector):
    """Draws each batch by phi's scores (see the module docstring)."""

    name = "dwm"
    config_section = "weighting"  # its candidates ratio is weighting.candidates
    uses_scorer = True  # constructed with the weighter's scorer
    log_selections = False  # one per step: the weighter logs the batch's domain shares instead

    def __init__(self, cfg: SelectorConfig | None = None, weighting: WeightingConfig | None = None, *,
                 scorer: Scorer):
        candidates = (weighting or WeightingConfig()).candidates
        super().__init__(SelectorConfig(mode="dwm", every=1, candidates=candidates))
        self.scorer = scorer

    def attach(self, ctx: TrainContext) -> None:
        super().attach(ctx)
        self.rng = np.random.default_rng([ctx.seed, 0x5E1])

    def score(self, ctx: TrainContext, ids: np.ndarray) -> np.ndarray:
        return self.scorer.score_ids(ctx.data, ids, ctx.model).astype(np.float64)

    def keep(self, ctx: TrainContext, ids: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
        p = self.scorer.weights(torch.from_numpy(scores)).numpy() / len(scores)
        return ids[gumbel_top_k(np.log(np.clip(p, 1e-300, None)), n, self.rng)]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state:
            self.rng.bit_generator.state = state["rng"]
