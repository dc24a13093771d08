"""The passes of a hypergradient and what they do across ranks. `Passes` runs the chunked passes of one update
(per-sample losses and the reference loss without a graph, gradients accumulated into fresh buffers, under the
training step's autocast); `Sharded` is what changes when the LM is sharded with FSDP (shards edited in place, a
plain backward into .grad, ranks padded to the same number of chunks); `all_reduce_`, `scalar_mean`, `norm`,
`ok_everywhere`, `global_batch` and `world_size` are the collectives and queries an update needs (no-ops on one
process). dwm.nn.bilevel computes the hypergradient with them."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from dwm.data.passages import passage_nll
from dwm.nn import sharding as fsdp
from dwm.nn.losses import per_sample_nll

_BUCKET = 1 << 26  # elements per all-reduce buffer (256 MB in float32): bounds the flat copy all_reduce_ makes


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(tensors: list[torch.Tensor], average: bool = False) -> None:
    """Sum (or average) a list of tensors across ranks in place, in flat buffers of at most 2^26 elements per
    dtype (one collective per buffer, so the extra memory is bounded whatever the model's size)."""
    world = world_size()
    if world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for t in ts:
            if buckets[-1] and size + t.numel() > _BUCKET:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += t.numel()
        for bucket in buckets:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            if average:
                flat /= world
            off = 0
            for b in bucket:
                b.copy_(flat[off: off + b.numel()].view_as(b))
                off += b.numel()


def scalar_mean(x: float, device: torch.device) -> float:
    if world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def norm(tensors: list[torch.Tensor]) -> float:
    """Global 2-norm; per-tensor norms in the tensors' dtype (no float64 copies), combined in Python floats."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors))


def ok_everywhere(ok: bool, device: torch.device) -> bool:
    """Every rank takes the same decision (one rank's non-finite dL/dw skips the update on all)."""
    if world_size() == 1:
        return ok
    t = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def global_batch(n_local: int, device: torch.device) -> int:
    if world_size() == 1:
        return n_local
    t = torch.tensor([n_local], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


class Sharded:
    """What an update does differently when the LM is sharded (train.parallel=fsdp, dwm/train/fsdp.py): its
    parameters are DTensor shards, edited in place shard by shard; a forward computes with gathered copies, so the
    gradients come from a plain backward into .grad, which FSDP reduce-scatters as the *mean* over ranks; every rank
    runs the same passes (each forward and backward is a collective); the units are resharded before the shards are
    edited (a forward without backward leaves the root unit gathered, and the next one would not re-gather).
    Unsharded (one process or DDP) it is autograd on the parameters plus all_reduce_'s sums and averages."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.on = model, fsdp.is_sharded(model)
        self.low_precision = self.on and fsdp.compute_dtype(model) in fsdp.LOW_PRECISION
        self.settle()

    def settle(self) -> None:
        if self.on:
            fsdp.reshard(self.model)

    def backward(self, loss: torch.Tensor, params: list[torch.Tensor]) -> None:
        if self.on:
            loss.backward()
        else:
            torch.autograd.backward(loss, inputs=params)

    def sum_over_ranks(self, ts: list[torch.Tensor]) -> None:
        if not self.on:
            all_reduce_(ts)
            return
        for t in ts:  # FSDP's reduce-scatter averaged: the sum is world x the mean
            t.mul_(world_size())

    def mean_over_ranks(self, ts: list[torch.Tensor]) -> None:
        if not self.on:
            all_reduce_(ts, average=True)

    def norm(self, ts: list[torch.Tensor]) -> float:
        return fsdp.global_norm(ts) if self.on else norm(ts)

    def extra_chunks(self, n_chunks: int, device: torch.device) -> int:
        """Sharded: how many more chunks the busiest rank runs than this one (0 unsharded)."""
        if not self.on:
            return 0
        t = torch.tensor([n_chunks], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) - n_chunks


class Passes:
    """The chunked passes of one hypergradient: model, chunk size and the training step's autocast. Sharded, a rank
    with fewer chunks than another runs the difference on its first sample, discarded (at weight 0 in a gradient)."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], chunk: int,
                 autocast_dtype: torch.dtype | None, sharded: Sharded):
        self.model, self.params, self.chunk, self.autocast_dtype = model, params, max(1, chunk), autocast_dtype
        self.sharded = sharded

    def padded(self, n: int, device: torch.device):
        """spans(n), then (0, 1) as often as other ranks have more chunks (the caller discards those)."""
        spans = list(self.spans(n))
        return spans + [(0, 1)] * self.sharded.extra_chunks(len(spans), device)

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def spans(self, n: int):
        return ((i, min(n, i + self.chunk)) for i in range(0, n, self.chunk))

    def sample_losses(self, ids: torch.Tensor, n_tok: torch.Tensor) -> torch.Tensor:
        """Per-sample NLL [n] without a graph, in the current precision settings (chunked)."""
        out = []
        with torch.no_grad():
            for a, b in self.padded(ids.shape[0], ids.device):
                out.append(per_sample_nll(self.model(input_ids=ids[a:b]).logits, ids[a:b], n_tok[a:b]))
        out = out[:len(list(self.spans(ids.shape[0])))]  # sharded: the padding chunks' losses dropped
        return torch.cat(out) if out else torch.zeros(0, device=ids.device)

    def ref_loss(self, ref_ids: torch.Tensor, ref_mask: torch.Tensor) -> float:
        """L_ref(theta) without a graph (chunked; the mean over passages)."""
        total = 0.0
        n = ref_ids.shape[0]
        with torch.no_grad(), self.autocast(ref_ids.device):
            for k, (a, b) in enumerate(self.padded(n, ref_ids.device)):
                per = passage_nll(self.model(input_ids=ref_ids[a:b]).logits, ref_ids[a:b], ref_mask[a:b],
                                  reduce=False)
                total += float(per.sum()) if k * self.chunk < n else 0.0  # sharded padding: dropped
        return total / n

    def grad(self, loss_of_chunk, n: int) -> tuple[list[torch.Tensor], float]:
        """sum over chunks of grad_theta loss_of_chunk(a, b), accumulated into fresh buffers (the parameters'
        `.grad` is set aside meanwhile and put back), and the summed loss value."""
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        total = 0.0
        try:
            with torch.enable_grad():
                for k, (a, b) in enumerate(self.padded(n, self.params[0].device)):
                    pad = k * self.chunk >= n  # sharded: a chunk other ranks run, at weight 0 here
                    with self.autocast(self.params[0].device):
                        loss = loss_of_chunk(a, b) * (0.0 if pad else 1.0)
                    self.sharded.backward(loss, self.params)
                    total += float(loss.detach())
                    del loss
            out = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        finally:
            for p, s in zip(self.params, saved):
                p.grad = s
        return out, total
