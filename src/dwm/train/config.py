"""The trainer's configuration sections: model, data, optimiser, budget, checkpoints, logging.

Every field's docstring (the string literal after it) is its help text (`dwm train --help-config`); `Literal`
fields are checked by `dwm.config.validate`, ranges by each section's `validate`. The whole run's config (these
sections plus the weighting and selector sections) is composed where the parts are wired, `dwm.run.RunConfig`;
the trainer reads only the sections below.

Defaults follow common LLaMA pretraining practice (the paper's: AdamW, cosine to 10%, 4M-token batches):
AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only, lr 5e-4 with linear warmup and cosine decay
to 10% of lr, gradient clip 1.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dwm.config import check_positive, check_range
from dwm.errors import UserError


@dataclass
class ModelConfig:
    """The language model."""

    spec: str = "cpu-small"
    """preset (tiny, cpu-mini, cpu-small, cpu-base, paper-370m, paper-1.3b) or a local Hugging Face model dir
    (config.json; model_type llama, qwen2, gpt2, gpt_neox or olmo)"""
    init: Literal["auto", "scratch", "pretrained"] = "auto"
    """for a model dir: pretrained = its weights, scratch = its architecture freshly initialised (seeded), auto =
    pretrained when the dir has weights, else scratch; presets are always scratch"""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """HF attention kernel"""

    def validate(self, prefix: str) -> None:
        from dwm.train.model import PRESETS

        s = self.spec
        if s not in PRESETS and not (Path(s).is_dir() or "/" in s or s.startswith(".")):
            raise UserError(f"config key {prefix}spec: unknown preset {s!r} (presets: {', '.join(PRESETS)}; "
                            "or give a local Hugging Face checkpoint directory)")
        if s in PRESETS and self.init == "pretrained":
            raise UserError(f"config key {prefix}init: pretrained needs a Hugging Face model directory, "
                            f"{s!r} is a preset (always initialised from scratch)")


@dataclass
class DataConfig:
    """The prepared training data."""

    dir: str = "data/prepared"
    """prepared data directory (`dwm prepare --out`)"""
    split: str = "train"
    """split to train on"""
    selection: str = ""
    """optional parquet manifest with a `sample_id` column: restricts the data to those rows, in that order"""
    shuffle: bool = True
    """reshuffle the split every epoch (seeded); a selection manifest's order is always kept"""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 5e-4
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """cosine decay ends at min_lr_ratio * lr"""
    warmup_steps: int = -1
    """linear warmup steps; -1 = warmup_fraction of the run"""
    warmup_fraction: float = 0.02
    """warmup length as a fraction of the total steps when warmup_steps = -1"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    eps: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.1
    """decoupled weight decay (matrices only: not norms or biases)"""
    grad_clip: float = 1.0
    """max global gradient norm; 0 = no clipping"""

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}lr", self.lr)
        check_range(f"{prefix}min_lr_ratio", self.min_lr_ratio, 0, 1)
        if self.warmup_steps < -1:
            raise UserError(f"config key {prefix}warmup_steps: must be >= 0 or -1 (auto), got {self.warmup_steps}")
        check_range(f"{prefix}warmup_fraction", self.warmup_fraction, 0, 1, hi_open=True)
        check_range(f"{prefix}beta1", self.beta1, 0, 1, hi_open=True)
        check_range(f"{prefix}beta2", self.beta2, 0, 1, hi_open=True)
        check_positive(f"{prefix}eps", self.eps)
        check_positive(f"{prefix}weight_decay", self.weight_decay, allow_zero=True)
        check_positive(f"{prefix}grad_clip", self.grad_clip, allow_zero=True)


@dataclass
class TrainConfig:
    """Batch, budget, device and precision."""

    global_batch_tokens: int = 65536
    """tokens per optimizer step over all ranks (paper: 4M); must be a multiple of seq_len"""
    micro_batch_size: int = 8
    """samples per forward/backward; accumulation = global batch / (micro_batch_size * world_size)"""
    max_steps: int = 0
    """optimizer steps to run; 0 = derive from max_tokens"""
    max_tokens: int = 0
    """token budget (rounded up to whole steps) when max_steps = 0 (paper: 30B)"""
    seed: int = 0
    """seed of model init, data order and weighter"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' = cuda when available"""
    precision: Literal["auto", "bf16", "fp32", "fp64"] = "auto"
    """'auto' = bf16 autocast on CUDA, fp32 on CPU; 'fp64' = float64 weights (numerical checks)"""
    compile: bool = False
    """torch.compile the model's forward/backward"""
    activation_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward instead of keeping them (less memory, about one
    more forward of compute); the bi-level update uses the same setting"""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """multi-process training: 'ddp' (each rank holds the whole model, optimizer state and gradients) or 'fsdp'
    (FSDP2 `fully_shard`: parameters, gradients and optimizer state sharded over the ranks); `dwm plan` says which
    fits"""
    memory_limit_gib: float = 0
    """refuse to start when the predicted peak memory per device (`dwm plan`) exceeds this many GiB; 0 = the GPU's
    total memory on CUDA, no check on the CPU"""
    keep_freed_memory: bool = True
    """on CPU (Linux, glibc): keep freed blocks in the process heap instead of returning the large ones (a
    micro-batch's logits) to the kernel and faulting them in again at every step (dwm.host: a cpu-small step's
    kernel time 0.46 -> 0.04 s, CPU time a median 1.05x, benchmarks/results/malloc.md); the heap keeps its
    high-water mark"""

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}global_batch_tokens", self.global_batch_tokens)
        check_positive(f"{prefix}micro_batch_size", self.micro_batch_size)
        check_positive(f"{prefix}max_steps", self.max_steps, allow_zero=True)
        check_positive(f"{prefix}max_tokens", self.max_tokens, allow_zero=True)
        if self.max_steps == 0 and self.max_tokens == 0:
            raise UserError(f"no training budget: set {prefix}max_steps or {prefix}max_tokens")
        if self.max_steps and self.max_tokens:
            raise UserError(f"set only one of {prefix}max_steps and {prefix}max_tokens")
        check_positive(f"{prefix}seed", self.seed, allow_zero=True)
        check_positive(f"{prefix}memory_limit_gib", self.memory_limit_gib, allow_zero=True)


@dataclass
class CheckpointConfig:
    """Checkpoint frequency and retention."""

    every: int = 500
    """save every this many steps (and at the end); 0 = only at the end"""
    keep_last: int = 2
    """keep the newest N checkpoints"""
    keep_every: int = 0
    """additionally keep checkpoints whose step is a multiple of this; 0 = none"""

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}every", self.every, allow_zero=True)
        check_positive(f"{prefix}keep_last", self.keep_last)
        check_positive(f"{prefix}keep_every", self.keep_every, allow_zero=True)


@dataclass
class LogConfig:
    """Metrics and progress."""

    every: int = 10
    """write a metrics.jsonl line every this many steps"""
    progress: bool = True
    """tqdm progress bar on rank 0"""
    tracker: Literal["none", "tensorboard", "wandb"] = "none"
    """also send every metrics.jsonl record's numbers to an experiment tracker: 'tensorboard' (event files in
    RUN_DIR/tb/; pip install 'dwm-llm[tensorboard]') or 'wandb' (pip install 'dwm-llm[wandb]'); metrics.jsonl
    stays the record"""
    tracker_project: str = "dwm"
    """wandb project name (tensorboard ignores it)"""
    tracker_offline: bool = True
    """wandb: write the run under RUN_DIR/wandb/ only, no network (upload later with `wandb sync`); false =
    stream to the wandb server"""

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}every", self.every)


@dataclass
class TrainerConfig:
    """What the trainer reads: the run directory and the training sections."""

    out: str = "runs/train"
    """run directory"""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self, prefix: str) -> None:
        if not self.out:
            raise UserError(f"config key {prefix}out: the run directory must be set")


# ---------------------------------------------------------------- what a config means for the data


@dataclass
class Plan:
    """What a validated config means for a given data set and world size."""

    seq_len: int
    vocab_size: int
    global_batch_size: int
    local_batch_size: int
    micro_batch_size: int
    grad_accum: int
    total_steps: int
    warmup_steps: int


def plan_for_data(cfg: TrainerConfig, world_size: int = 1) -> Plan:
    """Read the data's meta.json, check the paths the trainer needs, and return the Plan for this world size."""
    from dwm.data.dataset import read_meta

    meta = read_meta(cfg.data.dir)
    if cfg.data.split not in meta["splits"]:
        raise UserError(f"config key data.split: {cfg.data.dir} has no split {cfg.data.split!r}")
    if cfg.data.selection and not Path(cfg.data.selection).is_file():
        raise UserError(f"config key data.selection: {cfg.data.selection} does not exist")
    return make_plan(cfg, int(meta["seq_len"]), int(meta["vocab_size"]), world_size)


def make_plan(cfg: TrainerConfig, seq_len: int, vocab_size: int, world_size: int) -> Plan:
    t = cfg.train
    if t.global_batch_tokens % seq_len:
        raise UserError(f"train.global_batch_tokens ({t.global_batch_tokens}) is not a multiple of the data's "
                        f"seq_len ({seq_len})")
    gbs = t.global_batch_tokens // seq_len
    if gbs % (t.micro_batch_size * world_size):
        raise UserError(f"global batch of {gbs} samples (train.global_batch_tokens / seq_len) is not divisible by "
                        f"train.micro_batch_size ({t.micro_batch_size}) x world size ({world_size})")
    total = t.max_steps or math.ceil(t.max_tokens / t.global_batch_tokens)
    o = cfg.optim
    warm = o.warmup_steps if o.warmup_steps >= 0 else round(o.warmup_fraction * total)
    return Plan(seq_len=seq_len, vocab_size=vocab_size, global_batch_size=gbs, local_batch_size=gbs // world_size,
                micro_batch_size=t.micro_batch_size, grad_accum=gbs // (world_size * t.micro_batch_size),
                total_steps=total, warmup_steps=min(warm, total))
