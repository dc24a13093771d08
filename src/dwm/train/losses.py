"""Per-sample language-modelling loss: the quantity every weighter weights.

A sample is one row of the prepared memmap: `seq_len` token ids of which the first `n_tokens` are real and the
rest padding. The loss of sample i is the mean next-token NLL over its real predicted positions
(positions 1..n_tokens-1 predicted from their prefixes), so that a short padded sample and a full one are on the
same scale.
"""

from __future__ import annotations

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
