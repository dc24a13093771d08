"""The scorer: phi (the weighting network) and how its scores become weights, w = B softmax(s / tau) mixed with
the floor. One object, held by everything that acts on phi's scores: the in-batch weighter (dwm_weighter.py), the
resampling selector (resample.py) and phi's learner (learner.py). Under DDP each rank scores its share and
`gather` concatenates the shares in rank order, so a softmax over the gathered scores is over the global batch.

What it reads of a run is small: a `rows` object with `batch(ids) -> dwm.data.batch.Batch` (a prepared split, or
the library's in-memory rows) and, with the loss feature, the LM (`model`) for a no-grad per-sample loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dwm.data.batch import Batch
from dwm.nn.losses import per_sample_nll_chunked
from dwm.weighting.net import WeightingNet, weights_from_scores


class Scorer:
    """phi's scores and weights (see the module docstring). `net` is set by `bind` (the weighter's attach: the
    network is built or loaded there); until then the scorer holds only its configuration."""

    def __init__(self, temperature: float, floor: float, loss_feature: bool):
        self.temperature, self.floor = float(temperature), float(floor)
        self.loss_feature = loss_feature  # the LM's per-sample loss is one of phi's inputs
        self.net: WeightingNet | None = None
        self.device = torch.device("cpu")
        self.micro, self.rank, self.world = 1, 0, 1

    def bind(self, net: WeightingNet, device: torch.device, micro: int, rank: int = 0, world: int = 1) -> None:
        self.net, self.device, self.micro, self.rank, self.world = net, device, max(1, micro), rank, world

    # ------------------------------------------------------------ scores

    def gather(self, local: torch.Tensor, keep_grad: bool = False) -> torch.Tensor:
        """Concatenate every rank's tensor (rank order); with keep_grad the local part stays in the graph."""
        if self.world == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.detach().contiguous())
        if keep_grad:
            parts[self.rank] = local
        return torch.cat(parts)

    def lm_losses(self, model: torch.nn.Module | None, batch: Batch) -> torch.Tensor | None:
        """The LM's per-sample NLL of the batch (no grad, micro-batches) when phi reads it, else None."""
        if not self.loss_feature:
            return None
        assert model is not None
        return per_sample_nll_chunked(model, batch, self.micro)

    def scores(self, batch: Batch, lm_loss: torch.Tensor | None) -> torch.Tensor:
        """phi's scores of a batch, with a graph (one forward)."""
        assert self.net is not None
        return self.net(batch.input_ids, batch.n_tokens, batch.domain_ids, lm_loss)

    def chunked(self) -> bool:
        """Whether phi may score a batch in chunks: not when a sample's score depends on the rest of the batch
        (batch_context) or on a dropout draw (a second pass would draw another mask)."""
        assert self.net is not None
        return not (self.net.cfg.batch_context or self.net.cfg.dropout > 0)

    def scores_no_grad(self, batch: Batch, lm_loss: torch.Tensor | None) -> torch.Tensor:
        """phi's scores of a batch without a graph, a micro-batch of samples per forward (phi's memory per sample
        is far below the LM's, so this keeps it under a training micro-batch's)."""
        n = len(batch)
        step = self.micro if self.chunked() else max(1, n)
        with torch.no_grad():
            return torch.cat([self.scores(batch.slice(a, a + step), None if lm_loss is None else lm_loss[a:a + step])
                              for a in range(0, n, step)]) if n else torch.zeros(0, device=self.device)

    def score_ids(self, rows: Any, ids: np.ndarray, model: torch.nn.Module | None = None,
                  batch_size: int = 64) -> np.ndarray:
        """float32 scores of rows `ids` under the current phi (no batch context beyond each chunk of batch_size)."""
        assert self.net is not None
        self.net.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(ids), batch_size):
                b = rows.batch(ids[i:i + batch_size]).to(self.device)
                out.append(self.scores(b, self.lm_losses(model, b)).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    # ------------------------------------------------------------ weights

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """w = B softmax(s / tau), mixed with the floor: sum B, all ones when the scores are equal."""
        return weights_from_scores(scores, self.temperature, self.floor)

    def batch_weights(self, batch: Batch, losses: torch.Tensor | None = None) -> torch.Tensor:
        """The global batch's weights [B_global] (this rank's share scored, the scores gathered), no graph."""
        assert self.net is not None
        self.net.eval()
        with torch.no_grad():
            return self.weights(self.gather(self.scores_no_grad(batch, losses).float()))

    def local(self, W: torch.Tensor, n: int) -> torch.Tensor:
        """This rank's share (n samples) of a gathered tensor."""
        return W[self.rank * n:(self.rank + 1) * n]
