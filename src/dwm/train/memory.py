"""What a training step costs before it runs: parameters, FLOPs and peak memory per device.

Peak memory is *simulated*: the real step (the model's forward at `micro_batch` samples, the per-sample loss,
the weighted backward, gradient clipping and the AdamW step of `dwm.train.trainer.make_optimizer`) is traced
under torch's FakeTensorMode, where tensors have shapes and dtypes but no data, with
`torch.distributed._tools.mem_tracker.MemTracker` counting the bytes of every live storage by kind (parameters,
gradients, optimizer state, activations and temporaries). The second step is the one measured (the optimizer
state exists from then on); with gradient accumulation two micro-batches are traced (the second forward runs
with the first one's gradients alive). bf16 autocast (GPU runs with train.precision auto/bf16) is traced with
the CPU's autocast rules and flash attention (the CPU's fused SDPA kernel keeps the same O(T) statistics as
CUDA's flash kernel). Tracing cost grows with depth, not with tensor sizes, so models deeper than two layers are
traced at one and two layers and every kind is extrapolated linearly in the layer count (decoder layers are
identical); a trace takes well under a second at any size.

The breakdown is the state at the moment of the peak: weights + grads + optimizer + activations == peak
(activations = everything else alive then: saved activations, the logits and their gradient, temporaries).

FLOPs per trained token (model FLOPs, the MFU convention of PaLM / Chinchilla):
    6 * N_mm + 12 * L * d * T
N_mm = the weights of every matrix multiply (all nn.Linear weights including the LM head; the input embedding is
a lookup, not a matmul), L layers, hidden size d, T = seq_len: 2 FLOPs per multiply-add, forward 2*N_mm + 4*L*d*T
(the QK^T scores and the attention-weighted values, no causal halving), backward twice the forward. Activation
checkpointing recomputes the forward: the hardware does 8 * N_mm + 16 * L * d * T per token.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dwm.errors import UserError

GIB = 1024 ** 3


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model that its costs depend on."""

    n_params: int
    """distinct parameters (a tied embedding counted once; == dwm.train.model.count_params)"""
    n_matmul: int
    """weights of every matrix multiply (nn.Linear weights incl. the LM head)"""
    layers: int
    hidden: int
    vocab_size: int
    layer_params: int
    """parameters of one decoder layer"""
    outer_params: int
    """parameters outside the decoder layers (embedding, final norm, LM head when untied)"""


@dataclass
class StepMemory:
    """Bytes per device at the peak of a training step (see the module docstring for what each part holds)."""

    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in (("weights", self.weights), ("grads", self.grads),
                                         ("optimizer", self.optimizer), ("activations", self.activations),
                                         ("total", self.total))}


def llama_config_for(spec: str, vocab_size: int, seq_len: int, attn_implementation: str = "sdpa"):
    """The HF config of a preset (LLaMA) or of a local model directory (its config.json only, no weights), as
    dwm.train.model builds it."""
    from dwm.train.model import PRESETS, hf_config, llama_config

    if spec in PRESETS:
        cfg = llama_config(PRESETS[spec], vocab_size, max_seq_len=seq_len)
    else:
        cfg = hf_config(Path(spec), vocab_size, seq_len)
    cfg._attn_implementation = attn_implementation
    return cfg


def _fake_model(cfg, layers: int | None = None):
    """The real HF model class with fake (data-less) tensors; the caller holds the FakeTensorMode (or device)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if layers is not None:
        attn = cfg._attn_implementation
        cfg = copy.deepcopy(cfg)
        cfg.num_hidden_layers = layers
        cfg._attn_implementation = attn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(cfg, LlamaConfig):
            return LlamaForCausalLM(cfg)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=cfg._attn_implementation)


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)


def model_shape(spec: str, vocab_size: int, seq_len: int) -> ModelShape:
    """Parameter counts of the model `spec` builds for this data (built on the meta device: no memory, fast)."""
    cfg = llama_config_for(spec, vocab_size, seq_len)
    with torch.device("meta"):
        model = _fake_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    n_mm = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer = sum(p.numel() for p in _decoder_layers(model)[0].parameters())
    return ModelShape(n_params=n, n_matmul=n_mm, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                      vocab_size=cfg.vocab_size, layer_params=layer, outer_params=n - layer * cfg.num_hidden_layers)


def flops_per_token(shape: ModelShape, seq_len: int, *, recompute: bool = False) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per trained token: 6 N_mm + 12 L d T, and with activation checkpointing's
    recomputed forward 8 N_mm + 16 L d T (module docstring)."""
    fwd = 2.0 * shape.n_matmul + 4.0 * shape.layers * shape.hidden * seq_len
    return 3.0 * fwd, (4.0 if recompute else 3.0) * fwd


def forward_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """2 N_mm + 4 L d T: one forward (a no-grad pass costs this, a trained token three times it)."""
    return 2.0 * shape.n_matmul + 4.0 * shape.layers * shape.hidden * seq_len


def _trace(cfg, layers: int, micro_batch: int, seq_len: int, accum: int, dtype: torch.dtype, bf16: bool,
           checkpointing: bool) -> dict[str, float]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from dwm.train.config import OptimConfig
    from dwm.train.losses import per_sample_nll
    from dwm.train.model import enable_activation_checkpointing
    from dwm.train.trainer import make_optimizer

    with FakeTensorMode(allow_non_fake_inputs=False):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # fp64 runs: built in float64 (a fake .to() cannot swap the parameters)
        try:
            model = _fake_model(cfg, layers)
        finally:
            torch.set_default_dtype(prev)
        model.train()
        if checkpointing:
            enable_activation_checkpointing(model)
        opt = make_optimizer(model, OptimConfig())
        ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
        n_tok = torch.full((micro_batch,), seq_len, dtype=torch.long)
        w = torch.ones(micro_batch)

        def step(mt=None) -> None:
            opt.zero_grad(set_to_none=True)
            for _ in range(accum):
                if mt is not None:
                    mt.reset_mod_stats()  # per-module stats only (it refuses a module called twice); peaks stay
                ac = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
                with ac:
                    logits = model(input_ids=ids).logits
                nll = per_sample_nll(logits, ids, n_tok)
                del logits
                ((w * nll).sum() / (micro_batch * accum)).backward()
                del nll
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        for group in opt.param_groups:  # the optimizer state of a run past its first step, without that step
            for p in group["params"]:
                opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}
        mt = MemTracker()
        mt.track_external(model, opt)
        with warnings.catch_warnings(), mt:
            warnings.simplefilter("ignore")
            step(mt)
        snap = next(iter(mt.get_tracker_snapshot("peak").values()))
    kinds = {str(k.value if hasattr(k, "value") else k): float(v) for k, v in snap.items()}
    weights = kinds.get("Parameter", 0.0) + kinds.get("Buffer", 0.0)
    grads, opt_b = kinds.get("Gradient", 0.0), kinds.get("Optstate", 0.0)
    total = kinds["Total"]
    return {"weights": weights, "grads": grads, "optimizer": opt_b, "activations": total - weights - grads - opt_b}


def trace_step_memory(spec: str, vocab_size: int, seq_len: int, micro_batch: int, *, accum: int = 1,
                      dtype: torch.dtype = torch.float32, bf16_autocast: bool = False,
                      activation_checkpointing: bool = False, attn_implementation: str = "sdpa") -> StepMemory:
    """Simulated peak bytes of one training step on one device (whole model, no sharding): see the module
    docstring. `accum` > 1 traces two micro-batches of an accumulating step."""
    cfg = llama_config_for(spec, vocab_size, seq_len, attn_implementation)
    acc = 2 if accum > 1 else 1
    L = cfg.num_hidden_layers
    args = (micro_batch, seq_len, acc, dtype, bf16_autocast, activation_checkpointing)
    if L <= 2:
        m = _trace(cfg, L, *args)
    else:
        one, two = _trace(cfg, 1, *args), _trace(cfg, 2, *args)
        m = {k: one[k] + (L - 1) * (two[k] - one[k]) for k in one}
    return StepMemory(**m)


def per_device(step: StepMemory, shape: ModelShape, *, gpus: int, parallel: str, dtype_bytes: int = 4,
               gather_bytes: int | None = None) -> StepMemory:
    """One device's share under data parallelism. 'ddp': every rank holds the whole state, plus DDP's gradient
    buckets (a second copy of the gradients) when gpus > 1. 'fsdp' (dwm.train.fsdp: each decoder layer a unit, the
    root unit the embedding / final norm / LM head): weights, gradients and optimizer state are divided by the GPU
    count, plus the root unit and one decoder layer all-gathered at once (in `gather_bytes` per parameter: bf16
    under bf16 autocast's MixedPrecisionPolicy) with their unsharded gradients (reduced in `dtype_bytes`)."""
    if gpus <= 1:
        return StepMemory(step.weights, step.grads, step.optimizer, step.activations)
    if parallel == "ddp":
        return StepMemory(step.weights, 2 * step.grads, step.optimizer, step.activations)
    unit = shape.layer_params + shape.outer_params
    gathered = unit * (gather_bytes or dtype_bytes)
    return StepMemory(step.weights / gpus + gathered, step.grads / gpus + unit * dtype_bytes, step.optimizer / gpus,
                      step.activations)


def device_memory_bytes(device: torch.device) -> float:
    """Total memory of a CUDA device (0 for the CPU: no check)."""
    if device.type != "cuda":
        return 0.0
    return float(torch.cuda.get_device_properties(device).total_memory)


def fmt_gib(b: float) -> str:
    g = b / GIB
    return f"{g:.3g} GiB" if g < 10 else f"{g:,.1f} GiB"


# On the CPU the process's peak RSS exceeds the peak of live tensor bytes: glibc keeps freed blocks in the heap
# (dwm.host.keep_freed_memory raises its thresholds) and the large transient buffers of a step (logits, their
# gradient, each layer's activations) do not always fit the holes that freed ones leave. Calibrated on cpu-mini,
# cpu-small and cpu-base (benchmarks/bench_plan.py, benchmarks/results/plan.md): measured - simulated peak is
# 0.52-0.75 x the simulated activations.
CPU_HEAP_OVERHEAD = 0.65


@dataclass
class DeviceMemory:
    """The peak of one device: the training step's (`step`, the four parts plus `heap`, the CPU allocator's
    calibrated overhead) and, when a bi-level update runs, the update's (`update_peak`: the training state between
    steps (weights, optimizer state, DDP's gradient buckets; the trainer frees the gradients after each step) + the
    update's `update_extra` parameter-sized copies + one micro-batch's activations)."""

    step: StepMemory
    heap: float = 0.0
    update_extra: float = 0.0
    update_peak: float = 0.0

    @property
    def step_peak(self) -> float:
        return self.step.total + self.heap

    @property
    def peak(self) -> float:
        return max(self.step_peak, self.update_peak)


def plan_memory(spec: str, vocab_size: int, seq_len: int, micro_batch: int, *, accum: int = 1,
                precision: str = "auto", device_type: str = "cuda", activation_checkpointing: bool = False,
                gpus: int = 1, parallel: str = "ddp", attn_implementation: str = "sdpa",
                update_param_copies: int = 0, shape: ModelShape | None = None) -> DeviceMemory:
    """Predicted peak bytes per device of a run (simulated; see the module docstring). `update_param_copies`:
    the extra fp32 (fp64 runs: fp64) parameter-sized tensors a bi-level update holds beyond the training state
    (0 = no update); under fsdp they are copies of the local shards."""
    dtype = torch.float64 if precision == "fp64" else torch.float32
    bf16 = precision == "bf16" or (precision == "auto" and device_type == "cuda")
    shape = shape or model_shape(spec, vocab_size, seq_len)
    step = trace_step_memory(spec, vocab_size, seq_len, micro_batch, accum=accum, dtype=dtype, bf16_autocast=bf16,
                             activation_checkpointing=activation_checkpointing,
                             attn_implementation=attn_implementation)
    dev = per_device(step, shape, gpus=gpus, parallel=parallel, dtype_bytes=dtype.itemsize,
                     gather_bytes=2 if bf16 else dtype.itemsize)
    heap = CPU_HEAP_OVERHEAD * dev.activations if device_type == "cpu" else 0.0
    out = DeviceMemory(dev, heap)
    if update_param_copies:
        local = shape.n_params * dtype.itemsize / (gpus if parallel == "fsdp" else 1)
        out.update_extra = update_param_copies * local
        buckets = dev.grads - step.grads if parallel == "ddp" else 0.0  # DDP's persistent buckets (gpus > 1)
        state = dev.weights + dev.optimizer + buckets
        out.update_peak = state + out.update_extra + dev.activations + heap
    return out


def memory_line(m: DeviceMemory) -> str:
    """One line of the prediction: peak and its parts."""
    s = m.step
    parts = (f"weights {fmt_gib(s.weights)}, grads {fmt_gib(s.grads)}, optimizer {fmt_gib(s.optimizer)}, "
             f"activations {fmt_gib(s.activations)}" + (f", CPU heap {fmt_gib(m.heap)}" if m.heap else ""))
    line = f"training step {fmt_gib(m.step_peak)} ({parts})"
    if m.update_peak:
        line += f"; bi-level update {fmt_gib(m.update_peak)} (+{fmt_gib(m.update_extra)} of parameter copies)"
    return line


def check_memory(cfg, plan, world_size: int = 1, update_param_copies: int = 0) -> DeviceMemory | None:
    """Refuse a run whose predicted peak per device exceeds train.memory_limit_gib (0: the CUDA device's total
    memory; no check on the CPU) with one line carrying the prediction. cfg: a TrainerConfig; plan: its Plan for
    this world size. Returns the prediction (None when nothing is checked)."""
    t = cfg.train
    cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if t.memory_limit_gib > 0:
        limit, what = t.memory_limit_gib * GIB, "train.memory_limit_gib"
    elif cuda:
        limit, what = device_memory_bytes(torch.device("cuda", torch.cuda.current_device())), "the GPU's memory"
    else:
        return None
    m = plan_memory(cfg.model.spec, plan.vocab_size, plan.seq_len, plan.micro_batch_size, accum=plan.grad_accum,
                    precision=t.precision, device_type="cuda" if cuda else "cpu",
                    activation_checkpointing=t.activation_checkpointing, gpus=world_size, parallel=t.parallel,
                    attn_implementation=cfg.model.attn_implementation, update_param_copies=update_param_copies)
    if m.peak > limit:
        raise UserError(f"predicted peak memory per device {fmt_gib(m.peak)} exceeds {fmt_gib(limit)} ({what}): "
                        f"{memory_line(m)}; lower train.micro_batch_size, or set train.activation_checkpointing=true "
                        f"or train.parallel=fsdp (`dwm plan` shows the options)")
    return m
