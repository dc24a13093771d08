"""The weighter: the swappable component that turns a batch into per-sample weights.

The trainer owns the loop and the bookkeeping; a weighter decides how much each sample of the batch counts.
`UniformWeighter` is plain training. Weighters are found by name in `WEIGHTERS` (`weighting.mode`); the Data
Weighting Model registers itself there from `dwm.run`, so the trainer never imports it.

Contract (the trainer relies on it):
- constructed as `cls(section)` with the run's `weighting` config section (or no argument);
- `attach(ctx)` once, after the model, optimizer, data and (on --resume) the checkpoint are in place; a weighter
  may build its modules here; `ctx` is a `TrainContext`, all it may use of the trainer;
- `before_step(ctx, step)` before LM optimizer step `step` (0-based) on every rank, after resume too;
- `weights(batch, losses)` returns a float32 tensor [B_local] on the batch's device, detached, for this rank's
  share of the global batch. Weights are normalised over the *global* batch: their sum over all ranks equals the
  global batch size, so uniform weighting is all ones and the LM loss (1/B) sum_i w_i l_i is the plain mean when
  w == 1. `losses` is None unless the weighter sets `needs_losses`: then it is the LM's per-sample losses [B_local]
  (detached) from the training forward itself, under the same autocast/compile/DDP as the step. For that the
  trainer runs every micro-batch's forward before any backward and keeps their graphs, so a `needs_losses`
  weighter holds a whole local batch of activations (what gradient accumulation would otherwise save) but costs no
  extra forward; measured in benchmarks/results/train.md;
- `state_dict()` / `load_state_dict()` round-trip everything needed to resume exactly (saved in checkpoints);
- `step_metrics()` returns scalars to log for the last `weights` call (cheap, already-computed values);
- `selector` (class or instance attribute) may name the selector this weighter's batches must be drawn with
  (e.g. the DWM with apply = resample draws them by its scores: "dwm"); the run then builds that selector, and a
  selector with `uses_scorer` gets the weighter's `scorer` (one object both hold: no call back into the weighter);
- `config_section` names the run config's section the weighter is constructed with ("weighting").
"""

from __future__ import annotations

from typing import Any

import torch

from dwm.data.batch import Batch
from dwm.registry import Registry
from dwm.train.context import Component, TrainContext

WEIGHTERS = Registry("weighter", "weighting.mode")


class Weighter(Component):
    needs_losses: bool = False
    config_section: str = "weighting"
    selector: str | None = None  # the selector this weighter's batches are drawn with (None: the configured one)
    scorer: Any = None  # what a `uses_scorer` selector draws with (the weighter's own, shared object)

    def before_step(self, ctx: TrainContext, step: int) -> None:
        """Called before each LM optimizer step."""

    def weights(self, batch: Batch, losses: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


@WEIGHTERS.register("uniform")
class UniformWeighter(Weighter):
    """Plain training: every sample counts once."""

    name = "uniform"

    def weights(self, batch: Batch, losses: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ones(len(batch), dtype=torch.float32, device=batch.input_ids.device)
