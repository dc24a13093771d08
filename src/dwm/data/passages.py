"""LAMBADA-format passages: the one module that the target builder, the weighting model's reference set and the
evaluator share (reading the files, the context/target split, tokenizing, and the passage loss).

Format (lm-eval `lambada_openai`): one `{"text": passage}` a line (extra keys such as `book` or `doc_id` are
allowed). The target is the last space-separated word: context = " ".join(words[:-1]), target = " " + words[-1].
A real `lambada_openai` JSONL given by path is read exactly like the sets `dwm target build` writes.

`PassageSet` holds tokenized passages for one of two losses:
- "passage": mean NLL of every predicted token of the passage (a smooth, low-variance signal);
- "target": NLL of the last word only, with lm-eval's split (context = all words but the last, target = " " + last
  word), tokenized as context and continuation separately, as lm-eval does.
Passages are encoded as the model sees text: after the tokenizer's BOS when its policy adds one (the post-processor
of a prepared directory's tokenizer; dwm.data.tokenizer), so the first word is predicted from BOS as in training.
Batches are right-padded: the LM is causal, so padding after the real tokens never changes their logits, and the
padded positions are excluded by `loss_mask`. No attention mask is needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from dwm.data.tokenizer import special_prefix
from dwm.errors import UserError

# The shipped target (data/target): novels held out of the corpus, split by book.
REFERENCE_BOOKS: tuple[str, ...] = ("emma", "northangerabbey")
HELDOUT_BOOKS: tuple[str, ...] = ("persuasion", "mobydick")
HELD_OUT_BOOKS: tuple[str, ...] = REFERENCE_BOOKS + HELDOUT_BOOKS

LossMode = Literal["passage", "target"]


def split_context_target(text: str) -> tuple[str, str]:
    """(context, target) as lm-eval's lambada_openai: the target is the last space-separated word, with its
    leading space; the context is every word before it (lm-eval's doc_to_text / doc_to_target)."""
    words = text.split(" ")  # exactly lm-eval's text.split(' '), so scores are comparable
    if len(words) < 2 or not words[-1].strip() or not " ".join(words[:-1]).strip():
        raise UserError(f"a LAMBADA passage needs >= 2 space-separated words, got {text[:60]!r}")
    return " ".join(words[:-1]), " " + words[-1]


def json_lines(p: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON object is a
    UserError naming file:line."""
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{p}:{n}: expected a JSON object with a \"text\" field")
            yield n, obj


def load_passages(path: str | Path) -> list[str]:
    """Passages of a LAMBADA-format JSONL (ours or a real `lambada_openai` file).
    Each non-blank line must be a JSON object with a non-empty string "text" of >= 2 words; anything else is a
    UserError naming file:line, because a silently dropped passage changes the reported accuracy."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"target file not found: {p}")
    out: list[str] = []
    for n, obj in json_lines(p):
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{p}:{n}: missing or empty string field \"text\"")
        if len(text.split()) < 2:
            raise UserError(f"{p}:{n}: \"text\" needs at least 2 words (context + target)")
        out.append(text)
    if not out:
        raise UserError(f"{p}: no passages")
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids without special tokens, for a `tokenizers.Tokenizer` or a transformers tokenizer."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids) if hasattr(enc, "ids") else list(enc)


class PassageSet:
    """Tokenized passages, held in memory (target sets are small: thousands of passages).

    `batch(indices_or_rng, size)` -> (input_ids [N, T] int64, loss_mask [N, T] bool), T = longest in the batch.
    loss_mask[n, j] is True when token j of passage n is a predicted position (j >= 1) that the loss counts.
    """

    def __init__(self, path: str | Path | Sequence[str], tokenizer: Any, max_len: int, mode: LossMode = "passage",
                 pad_id: int = 0):
        """`path`: a LAMBADA-format JSONL file, or the passages' texts themselves (a list of strings)."""
        if max_len < 2:
            raise UserError(f"passage max_len must be >= 2, got {max_len}")
        texts = None if isinstance(path, (str, Path)) else [str(t) for t in path]
        self.path = Path(path) if texts is None else Path("<texts>")
        self.mode, self.max_len, self.pad_id = mode, max_len, pad_id
        self.ids: list[list[int]] = []
        self.masks: list[list[bool]] = []
        self.n_skipped = 0  # passages with nothing to predict within max_len
        self.prefix = special_prefix(tokenizer)  # [BOS] when the tokenizer's policy puts one before every text
        for text in load_passages(self.path) if texts is None else texts:  # file: UserError naming file:line
            item = self._tokenize(tokenizer, text)
            if item is None:
                self.n_skipped += 1
                continue
            self.ids.append(item[0])
            self.masks.append(item[1])
        if not self.ids:
            raise UserError(f"{self.path}: no usable passages ({self.n_skipped} too short or empty)")

    def _tokenize(self, tokenizer: Any, text: str) -> tuple[list[int], list[bool]] | None:
        if self.mode == "passage":
            ids = (self.prefix + _encode(tokenizer, text))[: self.max_len]
            if len(ids) < 2:
                return None
            return ids, [False] + [True] * (len(ids) - 1)
        try:
            context, target = split_context_target(text)
        except UserError:
            return None
        ctx, tgt = self.prefix + _encode(tokenizer, context), _encode(tokenizer, target)
        if not ctx or not tgt or len(tgt) >= self.max_len:
            return None
        ctx = ctx[-(self.max_len - len(tgt)):]  # keep the end of the context next to the target
        return ctx + tgt, [False] * len(ctx) + [True] * len(tgt)

    @classmethod
    def from_token_ids(cls, passages: Sequence[Sequence[int]], max_len: int, pad_id: int = 0) -> PassageSet:
        """Passages given as token ids (already with any BOS), every position after the first predicted."""
        self = cls.__new__(cls)
        self.path, self.mode, self.max_len, self.pad_id = Path("<token ids>"), "passage", max_len, pad_id
        self.prefix = []
        self.ids = [[int(t) for t in p][:max_len] for p in passages if len(p) >= 2]
        self.masks = [[False] + [True] * (len(i) - 1) for i in self.ids]
        self.n_skipped = len(passages) - len(self.ids)
        if not self.ids:
            raise UserError("reference: no usable passages (each needs at least 2 tokens)")
        return self

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
            raise UserError("empty passage batch")
        T = max(len(self.ids[i]) for i in idx)
        input_ids = torch.full((len(idx), T), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros((len(idx), T), dtype=torch.bool)
        for r, i in enumerate(idx):
            n = len(self.ids[i])
            input_ids[r, :n] = torch.tensor(self.ids[i], dtype=torch.long)
            loss_mask[r, :n] = torch.tensor(self.masks[i], dtype=torch.bool)
        return input_ids, loss_mask


def passage_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                reduce: bool = True) -> torch.Tensor:
    """Mean over passages of the mean masked next-token NLL (each passage counts equally, whatever its length);
    with reduce=False, the per-passage means [N].

    logits [N, T, V] predict input_ids shifted by one; loss_mask [N, T] marks predicted token positions.
    Computed in float32 at least (float64 logits stay float64).
    """
    N, T, V = logits.shape
    shift = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(shift.reshape(-1, V), input_ids[:, 1:].reshape(-1), reduction="none").view(N, T - 1)
    mask = loss_mask[:, 1:].to(nll.dtype)
    per = (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return per.mean() if reduce else per
