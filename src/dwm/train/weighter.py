"""The weighter: the swappable component that turns a batch into per-sample weights.

The trainer owns the loop and the bookkeeping; a weighter decides how much each sample of the batch counts.
`UniformWeighter` is plain training. The Data Weighting Model (`dwm.weighting.dwm_weighter.DWMWeighter`) is the
same interface plus bi-level updates of its own parameters, done in `before_step`.

Contract (the trainer relies on it):
- `weights(batch)` returns a float32 tensor [B_local] on the batch's device, detached, for this rank's share of the
  global batch. Weights are normalised over the *global* batch: their sum over all ranks equals the global batch
  size, so uniform weighting is all ones and the LM loss (1/B) sum_i w_i l_i is the plain mean when w == 1.
- `before_step(trainer, step)` runs before LM optimizer step `step` (0-based) on every rank, after resume too.
- `state_dict()` / `load_state_dict()` round-trip everything needed to resume exactly (saved in checkpoints).
- `step_metrics()` returns scalars to log for the last `weights` call (cheap, already-computed values).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dwm.train.batch import Batch

if TYPE_CHECKING:  # pragma: no cover
    from dwm.train.trainer import Trainer


class Weighter:
    name = "base"

    def attach(self, trainer: Trainer) -> None:
        """Called once after the model, optimizer, data and (on --resume) the checkpoint are in place."""

    def before_step(self, trainer: Trainer, step: int) -> None:
        """Called before each LM optimizer step."""

    def weights(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def step_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class UniformWeighter(Weighter):
    """Plain training: every sample counts once."""

    name = "uniform"

    def weights(self, batch: Batch) -> torch.Tensor:
        return torch.ones(len(batch), dtype=torch.float32, device=batch.input_ids.device)
