"""Reference batches: the LAMBADA-format passages the weighting model is optimised against (the outer loss).

A reference file is JSONL, one `{"text": passage}` a line (see docs/ARCHITECTURE.md). Two outer losses:
- "passage": mean NLL of every predicted token of the passage (a smooth, low-variance signal);
- "target": NLL of the last word only, with lm-eval's lambada_openai split (context = all words but the last,
  target = " " + last word), tokenized as context and continuation separately, as lm-eval does.

Batches are right-padded: the LM is causal, so padding after the real tokens never changes their logits, and the
padded positions are simply excluded by `loss_mask`. No attention mask is needed (nor passed by bilevel.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dwm.data.target import load_passages, split_context_target
from dwm.errors import UserError

MODES = ("passage", "target")


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids without special tokens, for a `tokenizers.Tokenizer` or a transformers tokenizer."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids) if hasattr(enc, "ids") else list(enc)


class ReferenceSet:
    """Tokenized reference passages, held in memory (reference sets are small: thousands of passages).

    `batch(indices_or_rng, size)` -> (input_ids [N, T] int64, loss_mask [N, T] bool), T = longest in the batch.
    loss_mask[n, j] is True when token j of passage n is a predicted position (j >= 1) that the outer loss counts.
    """

    def __init__(self, path: str | Path, tokenizer: Any, max_len: int, mode: str = "passage", pad_id: int = 0):
        if mode not in MODES:
            raise UserError(f"reference loss mode must be one of {MODES}, got {mode!r}")
        if max_len < 2:
            raise UserError(f"reference max_len must be >= 2, got {max_len}")
        self.path, self.mode, self.max_len, self.pad_id = Path(path), mode, max_len, pad_id
        self.ids: list[list[int]] = []
        self.masks: list[list[bool]] = []
        self.n_skipped = 0  # passages with nothing to predict within max_len
        for text in load_passages(self.path):  # UserError naming file:line on a malformed line
            item = self._tokenize(tokenizer, text)
            if item is None:
                self.n_skipped += 1
                continue
            self.ids.append(item[0])
            self.masks.append(item[1])
        if not self.ids:
            raise UserError(f"{self.path}: no usable reference passages ({self.n_skipped} too short or empty)")

    def _tokenize(self, tokenizer: Any, text: str) -> tuple[list[int], list[bool]] | None:
        if self.mode == "passage":
            ids = _encode(tokenizer, text)[: self.max_len]
            if len(ids) < 2:
                return None
            return ids, [False] + [True] * (len(ids) - 1)
        try:
            context, target = split_context_target(text)
        except UserError:
            return None
        ctx, tgt = _encode(tokenizer, context), _encode(tokenizer, target)
        if not ctx or not tgt or len(tgt) >= self.max_len:
            return None
        ctx = ctx[-(self.max_len - len(tgt)):]  # keep the end of the context next to the target
        return ctx + tgt, [False] * len(ctx) + [True] * len(tgt)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int] | np.random.Generator | torch.Generator | None = None,
              size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A right-padded batch of the given passage indices, or `size` distinct passages drawn with an rng."""
        if isinstance(indices, np.random.Generator):
            idx = indices.choice(len(self), size=min(size or len(self), len(self)), replace=False).tolist()
        elif isinstance(indices, torch.Generator):
            idx = torch.randperm(len(self), generator=indices)[: size or len(self)].tolist()
        elif indices is None:
            idx = list(range(min(size or len(self), len(self))))
        else:
            idx = [int(i) for i in indices]
        if not idx:
            raise UserError("empty reference batch")
        T = max(len(self.ids[i]) for i in idx)
        input_ids = torch.full((len(idx), T), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros((len(idx), T), dtype=torch.bool)
        for r, i in enumerate(idx):
            n = len(self.ids[i])
            input_ids[r, :n] = torch.tensor(self.ids[i], dtype=torch.long)
            loss_mask[r, :n] = torch.tensor(self.masks[i], dtype=torch.bool)
        return input_ids, loss_mask


def reference_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean over passages of the mean masked next-token NLL (each passage counts equally, whatever its length).

    logits [N, T, V] predict input_ids shifted by one; loss_mask [N, T] marks predicted token positions.
    Computed in float32 at least (float64 logits stay float64).
    """
    N, T, V = logits.shape
    shift = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(shift.reshape(-1, V), input_ids[:, 1:].reshape(-1), reduction="none").view(N, T - 1)
    mask = loss_mask[:, 1:].to(nll.dtype)
    return ((nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)).mean()
