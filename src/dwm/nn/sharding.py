"""What the maths layer needs to know of a sharded LM (train.parallel = fsdp; the sharding itself is
dwm/train/fsdp.py): whether a model is sharded, the dtype its gathered parameters compute in, putting every unit
back in its sharded state, and a norm over DTensor shards."""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when `model` (or a submodule) was passed to fully_shard."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())

def compute_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype FSDP casts the gathered parameters to for compute (None: no cast, or not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            return m._get_fsdp_state()._mp_policy.param_dtype
    return None

def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP unit back in its sharded state (the root unit stays gathered after a forward until its
    backward; a forward without backward leaves it so). After this, `model.parameters()` are the DTensor shards and
    the next forward all-gathers them again, so an in-place edit of the shards is seen."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()

def global_norm(tensors: list[torch.Tensor]) -> float:
    """2-norm over a list of tensors, DTensor shards included (their local parts' squares summed over ranks; a
    collective when there are any). Per-tensor norms in the tensors' dtype, combined in float64."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    plain = sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors if not isinstance(t, DTensor))
    shards = [t.to_local() for t in tensors if isinstance(t, DTensor)]
    if shards:
        sq = torch.stack([torch.linalg.vector_norm(s).double() ** 2 for s in shards]).sum()
        if dist.is_initialized():
            dist.all_reduce(sq)
        plain += float(sq)
    return plain ** 0.5


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a DTensor (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
