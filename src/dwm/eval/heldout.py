"""Held-out language-modelling loss and perplexity per domain on a prepared directory's `val` split.

The per-sample loss is `dwm.nn.losses.per_sample_nll` (the quantity the weighters weight), so held-out and
training losses are on the same footing. Aggregation is token-weighted: a domain's loss is its summed token NLL
over its predicted tokens (n_tokens - 1 per sample), i.e. per-sample means weighted by their token counts, so a
domain's perplexity is exp(mean NLL per token) whatever its row lengths. "overall" pools every domain the same way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dwm.data.batch import Batch
from dwm.data.dataset import PreparedData
from dwm.errors import UserError
from dwm.nn.losses import nll_no_grad


@torch.no_grad()
def sample_losses(model: torch.nn.Module, data: PreparedData, batch_size: int = 16,
                  max_samples: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean NLL per sample, predicted tokens per sample, domain id per sample) for the first `max_samples` rows.

    Rows with fewer than 2 real tokens predict nothing and get weight 0.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    n = len(data) if max_samples is None else min(len(data), max_samples)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def batches():
        for start in range(0, n, batch_size):
            b = data.batch(np.arange(start, min(start + batch_size, n))).to(device)
            # Trim trailing all-padding columns: causal attention makes the real positions' logits unchanged.
            yield Batch(b.input_ids[:, :max(int(b.n_tokens.max()), 2)], b.n_tokens, b.sample_ids, b.domain_ids)

    try:
        losses = nll_no_grad(model, batches()).double().cpu().numpy() if n else np.zeros(0)
    finally:
        model.train(was_training)
    counts = np.clip(data.n_tokens[:n] - 1, 0, None).astype(np.int64)
    return losses, counts, data.domain_ids[:n].copy()


def _summary(losses: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    tokens = int(counts.sum())
    loss = float((losses * counts).sum() / tokens) if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens and loss < 700 else float("nan"),
            "n_samples": int((counts > 0).sum()), "n_tokens": tokens}


def heldout_eval(model: torch.nn.Module, data_dir: str | Path, split: str = "val", batch_size: int = 16,
                 max_samples: int | None = None) -> dict[str, Any]:
    """{"per_domain": {domain: {"loss", "perplexity", "n_samples", "n_tokens"}}, "overall": {...}, "split",
    "n_samples"} on `data_dir`'s `split`; a domain without held-out rows is omitted. An empty split (a small input
    prepared with the default --val-fraction) is not an error: the result says {"skipped": why}, so that an
    evaluation asked for a target still reports it."""
    data = PreparedData(data_dir, split)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and data.vocab_size > vocab:
        raise UserError(f"{data_dir}: tokenizer vocab {data.vocab_size} > model vocab {vocab}: "
                        "this is not the data the run was trained on")
    if len(data) == 0:
        return {"split": split, "n_samples": 0, "per_domain": {},
                "skipped": f"split {split!r} of {data_dir} is empty (re-prepare with more documents or a larger "
                           f"--val-fraction)"}
    losses, counts, dom = sample_losses(model, data, batch_size=batch_size, max_samples=max_samples)
    per_domain = {name: _summary(losses[dom == i], counts[dom == i])
                  for i, name in enumerate(data.domains) if (dom == i).any()}
    return {"split": split, "n_samples": len(losses), "per_domain": per_domain,
            "overall": _summary(losses, counts)}
