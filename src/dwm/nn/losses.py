"""Per-sample language-modelling loss: the quantity every weighter weights.

A sample is one row of the prepared memmap: `seq_len` token ids of which the first `n_tokens` are real and the
rest padding. The loss of sample i is the mean next-token NLL over its real predicted positions
(positions 1..n_tokens-1 predicted from their prefixes), so that a short padded sample and a full one are on the
same scale.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def target_mask(n_tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, T-1] bool: which shifted positions are real targets (target index j+1 < n_tokens)."""
    pos = torch.arange(1, seq_len, device=n_tokens.device)
    return pos.unsqueeze(0) < n_tokens.unsqueeze(1)


def per_sample_nll(logits: torch.Tensor, input_ids: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Mean token NLL per sequence, [B] in float32 (computed in float32 even under bf16 autocast; float64 logits
    stay float64, which the bi-level finite-difference tests need).

    logits: [B, T, V]; input_ids: [B, T]; n_tokens: [B] number of real tokens (>= 2 for a defined loss).
    """
    B, T, V = logits.shape
    # Shift the labels, not the logits: logits[:, :-1] would copy the whole [B, T, V] tensor (and its gradient);
    # the last position's loss (against a dummy label) is computed and dropped.
    labels = F.pad(input_ids[:, 1:], (0, 1))
    flat = logits.reshape(-1, V).to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(flat, labels.reshape(-1), reduction="none").view(B, T)[:, :-1]
    mask = target_mask(n_tokens, T).to(nll.dtype)
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def nll_no_grad(model: torch.nn.Module, batches, autocast=None) -> torch.Tensor:
    """The LM's per-sample NLL of each batch in turn (an iterable of dwm.data.batch.Batch on the model's
    device), without a graph and under `autocast` (a context manager factory, e.g. the training step's), [N] on
    the batches' device. The one no-grad loss loop: chunk the samples by how the batches are cut."""
    out = []
    with torch.no_grad(), (autocast() if autocast is not None else contextlib.nullcontext()):
        for b in batches:
            out.append(per_sample_nll(model(input_ids=b.input_ids).logits, b.input_ids, b.n_tokens))
    return torch.cat(out) if out else torch.zeros(0)


def per_sample_nll_chunked(model: torch.nn.Module, batch, chunk: int, autocast=None) -> torch.Tensor:
    """nll_no_grad over a Batch cut into chunks of `chunk` samples (a training micro-batch: the memory of one)."""
    return nll_no_grad(model, (batch.slice(i, i + chunk) for i in range(0, len(batch), chunk)), autocast)
