"""What the trainer hands to a step and to a weighter."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """This rank's share of one global batch (all of its micro-batches together).

    input_ids: [B, T] int64 token ids (padding after n_tokens is the tokenizer's pad id)
    n_tokens:  [B] int64 number of real tokens per sample
    sample_ids:[B] int64 row index in the prepared split (stable id: probes and analyses key on it)
    domain_ids:[B] int64 index into PreparedData.domains
    """

    input_ids: torch.Tensor
    n_tokens: torch.Tensor
    sample_ids: torch.Tensor
    domain_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.n_tokens, self.sample_ids, self.domain_ids)))

    def slice(self, start: int, stop: int) -> Batch:
        return Batch(self.input_ids[start:stop], self.n_tokens[start:stop],
                     self.sample_ids[start:stop], self.domain_ids[start:stop])
