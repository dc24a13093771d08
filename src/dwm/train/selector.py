"""The selector: the swappable component that decides which samples form each global batch.

`SequentialSelector` (the default) is the data order every run had before selectors existed: step s trains on
positions [s*G, (s+1)*G) of a stream that is the split reshuffled per epoch with `default_rng([seed, epoch])`
(or the selection manifest's order, or the split's order with data.shuffle = false). It is a pure function of the
config, so runs with and without any weighter see the same batches.

`OnlineSelector` is the base of model-aware online selection (MATES-style): every `every` steps it takes the next
`candidates` x (every x G) samples of the same stream, scores them with the current model (`score`, the
subclass's), keeps the best every x G (in stream order) and serves them as the next `every` batches. A dropped
sample is never forwarded by the LM; the cost is the subclass's scoring. Kept ids are chosen on rank 0 and
broadcast, so every rank trains on the same global batch; they are part of the checkpoint, so a resumed run
continues the same chunk exactly.

Selectors are found by name in `SELECTORS` (`selector.mode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.distributed as dist

from dwm.config import check_positive
from dwm.errors import UserError
from dwm.nn.sampling import top_k
from dwm.registry import Registry
from dwm.train.context import Component, TrainContext

SELECTORS = Registry("selector", "selector.mode")


@dataclass
class SelectorConfig:
    """Which samples form each batch."""

    mode: str = "sequential"
    """'sequential' (the data order), or a registered online selector that re-selects from a candidate pool"""
    every: int = 10
    """online selectors: choose the samples of this many steps at a time"""
    candidates: float = 2.0
    """online selectors: samples scored per sample kept (2.0 = keep the better half of each candidate pool)"""

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}every", self.every)
        if self.candidates < 1:
            raise UserError(f"config key {prefix}candidates: must be >= 1, got {self.candidates}")


class Selector(Component):
    config_section: str | None = None  # a run config section the selector is also constructed with
    uses_scorer: bool = False  # constructed with the weighter's `scorer` (keyword `scorer`)

    def __init__(self, cfg: SelectorConfig | None = None):
        super().__init__(cfg or SelectorConfig())

    def batch_ids(self, ctx: TrainContext, step: int) -> np.ndarray:
        """Sample ids [G] of the whole global batch of optimizer step `step` (every rank gets the same)."""
        raise NotImplementedError


@SELECTORS.register("sequential")
class SequentialSelector(Selector):
    """The data order: seeded reshuffle per epoch, or the manifest's order (see the module docstring)."""

    name = "sequential"

    def attach(self, ctx: TrainContext) -> None:
        self.pool, self.seed, self.shuffle = ctx.pool, ctx.seed, ctx.shuffle
        self.G = ctx.plan.global_batch_size
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.shuffle:
            order = self.pool[np.random.default_rng([self.seed, epoch]).permutation(len(self.pool))]
        else:
            order = self.pool
        self._order_cache = (epoch, order)
        return order

    def stream(self, pos: int, n: int) -> np.ndarray:
        """Sample ids at stream positions [pos, pos + n), wrapping over epochs."""
        out = np.empty(n, dtype=np.int64)
        filled, N = 0, len(self.pool)
        while filled < n:
            epoch, off = divmod(pos, N)
            take = min(n - filled, N - off)
            out[filled:filled + take] = self._epoch_order(epoch)[off:off + take]
            filled += take
            pos += take
        return out

    def batch_ids(self, ctx: TrainContext, step: int) -> np.ndarray:
        return self.stream(step * self.G, self.G)


class OnlineSelector(SequentialSelector):
    """Keep the best `every` x G of each `candidates` x larger chunk of the stream (see the module docstring).
    Subclasses implement `score(ctx, ids) -> [len(ids)] float` (higher = keep); `keep` may be overridden (e.g. a
    Gumbel top-k instead of the deterministic top-k)."""

    name = "online"
    log_selections = True  # one "select" event in metrics.jsonl per chunk

    def attach(self, ctx: TrainContext) -> None:
        super().attach(ctx)
        self.n_keep = self.cfg.every * self.G
        self.n_cand = max(self.n_keep, round(self.cfg.candidates * self.n_keep))
        self.chunk = -1
        self.kept = np.zeros(0, dtype=np.int64)
        self._metrics: dict[str, float] = {}

    def score(self, ctx: TrainContext, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def keep(self, ctx: TrainContext, ids: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
        """The n best-scoring candidates (ties: earlier in the stream first), in stream order."""
        return ids[top_k(scores, n)]

    def _select(self, ctx: TrainContext, chunk: int) -> np.ndarray:
        ids = self.stream(chunk * self.n_cand, self.n_cand)
        kept = None
        if ctx.rank == 0:
            scores = np.asarray(self.score(ctx, ids), dtype=np.float64)
            if scores.shape != ids.shape:
                raise ValueError(f"{type(self).__name__}.score returned shape {scores.shape}, expected {ids.shape}")
            kept = self.keep(ctx, ids, scores, self.n_keep).astype(np.int64)
        if ctx.world_size > 1:
            box = [kept]
            dist.broadcast_object_list(box, src=0)
            kept = box[0]
        assert kept is not None and len(kept) == self.n_keep
        if self.log_selections:
            ctx.log({"event": "select", "chunk": chunk, "candidates": len(ids), "kept": len(kept)})
        return kept

    def batch_ids(self, ctx: TrainContext, step: int) -> np.ndarray:
        chunk = step // self.cfg.every
        if chunk != self.chunk:
            self.kept, self.chunk = self._select(ctx, chunk), chunk
        off = (step - chunk * self.cfg.every) * self.G
        self._metrics = {"select_kept_fraction": self.n_keep / self.n_cand}
        return self.kept[off:off + self.G]

    def step_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "kept": self.kept.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.chunk, self.kept = int(state["chunk"]), np.asarray(state["kept"], dtype=np.int64)
