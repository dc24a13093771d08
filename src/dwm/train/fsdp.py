"""`train.parallel = "fsdp"`: the LM sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`) over all ranks.

What is sharded: every decoder layer (the model's `_no_split_modules`) is its own FSDP unit (its parameters
all-gathered for its forward and backward, then freed), and the root unit holds the rest (embeddings, the final
norm, the LM head; a tied head is one parameter). Each parameter is a DTensor sharded on dim 0 over a 1-D device
mesh of all ranks; its gradient comes back reduce-scattered (the mean over ranks) and the AdamW state lives next to
the local shard only.

Precision: on CUDA with train.precision auto/bf16 the all-gathered parameters are cast to bf16 for compute and the
gradients reduced in float32 (`MixedPrecisionPolicy`); the sharded master weights and the optimizer state stay
float32. Elsewhere (CPU, fp32, fp64) parameters are gathered and gradients reduced in their own dtype.

Checkpoints are the same files as without FSDP: `model/` holds the full (unsharded) weights as a plain Hugging Face
directory (rank 0 writes it; `dwm eval` / `dwm export` load it without FSDP), and `trainer_state.pt` the full
optimizer state keyed by parameter name (torch.distributed.checkpoint's get/set_optimizer_state_dict with
full_state_dict), which every rank re-shards on resume. Either kind of checkpoint resumes either way (sharded or
not; tested 2 sharded processes -> 1 and 2 DDP processes -> 2 sharded); only a resume with the same setting is
exact to the bit.
"""

from __future__ import annotations

from typing import Any

import torch

from dwm.errors import UserError
from dwm.nn.sharding import (  # noqa: F401 (re-exported)
    LOW_PRECISION,
    compute_dtype,
    full_tensor,
    global_norm,
    is_sharded,
    reshard,
)


def shard_model(model: torch.nn.Module, device: torch.device, world_size: int, *, bf16: bool) -> torch.nn.Module:
    """fully_shard each decoder layer, then the root, over a 1-D mesh of `world_size` ranks (in place; returns
    `model`, now an FSDPModule whose parameters are DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    # bf16 compute: gradients reduced in float32; otherwise in the parameters' own dtype (float64 stays float64)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32 if bf16 else None)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face causal LM: the modules of the classes it names as never to be split
    (`_no_split_modules`: LlamaDecoderLayer, GPT2Block, GPTNeoXLayer, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on the CPU of rank 0 (an empty dict elsewhere); a collective: all ranks call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimizer state keyed by parameter name, on the CPU of rank 0 (empty elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: torch.nn.Module, model_sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Re-shard a full model state (every rank passes the whole dict, read from the checkpoint) into the sharded
    model. Returns the (missing, unexpected) keys."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from dwm.train.model import tied_parameter_names

    model_sd = dict(model_sd)
    for group in tied_parameter_names(model):  # save_pretrained wrote one name of the group: one parameter
        have = sorted(n for n in group if n in model_sd)
        for n in group - set(have) if have else ():
            model_sd[n] = model_sd[have[0]]
    res = set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True, strict=False))
    return list(res.missing_keys), list(res.unexpected_keys)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict[str, Any]) -> None:
    """Load a full optimizer state into `optimizer`, sharded or not (every rank passes the whole dict): either
    full_optimizer_state's (keyed by parameter name) or torch's own `optimizer.state_dict()` of an unsharded run
    (keyed by position), which is first keyed by name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if any(isinstance(i, int) for g in optim_sd["param_groups"] for i in g["params"]):
        optim_sd = _by_name(model, optimizer, optim_sd)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))


def _by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """torch's optimizer state (parameters numbered in the order of the param groups) keyed by parameter name,
    numbering `optimizer`'s parameters the same way (the trainer builds its groups alike, sharded or not)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in sd["param_groups"] for i in g["params"]]
    if len(saved) != len(order):
        raise UserError(f"--resume: the saved optimizer state has {len(saved)} parameters, this model {len(order)}")
    name = dict(zip(saved, order))
    return {"state": {name[i]: st for i, st in sd["state"].items()},
            "param_groups": [{**g, "params": [name[i] for i in g["params"]]} for g in sd["param_groups"]]}


def plain_like(model: torch.nn.Module) -> torch.nn.Module:
    """An empty (meta device) model of `model`'s Hugging Face class, config and dtype, without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    return plain.to(next(model.parameters()).dtype)


def plain_model(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded, non-FSDP) copy of `model`'s class and config holding `state`: what `save_pretrained`
    writes, so config.json names the Hugging Face class, not FSDP's subclass of it."""
    plain = plain_like(model)
    plain.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------- for a component's own passes (bi-level updates)
