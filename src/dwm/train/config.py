"""The training configuration: typed dataclasses, loaded from TOML, overridden by dotted `key=value` arguments.

Every field's docstring (the string literal after it) is its help text (`dwm train --help-config`). Values are
parsed by the field's type and every invalid value is rejected before anything is built (`validate`), so a bad run
fails in a second with one clear line instead of after loading a model.

Defaults follow common LLaMA pretraining practice (the paper's: AdamW, cosine to 10%, 4M-token batches):
AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only, lr 5e-4 with linear warmup and cosine decay
to 10% of lr, gradient clip 1.0.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import itertools
import json
import math
import sys
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from dwm.errors import UserError
from dwm.weighting.config import WeightingConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    """The language model."""

    spec: str = "cpu-small"
    """preset (tiny, cpu-small, cpu-base, paper-370m, paper-1.3b) or a local HF checkpoint dir to continue from"""
    attn_implementation: str = "sdpa"
    """HF attention kernel: 'sdpa', 'eager' or 'flash_attention_2'"""


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
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'"""
    precision: str = "auto"
    """'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16', 'fp32', or 'fp64' (float64 weights: numerical checks)"""
    compile: bool = False
    """torch.compile the model's forward/backward"""


@dataclass
class CheckpointConfig:
    """Checkpoint frequency and retention."""

    every: int = 500
    """save every this many steps (and at the end); 0 = only at the end"""
    keep_last: int = 2
    """keep the newest N checkpoints"""
    keep_every: int = 0
    """additionally keep checkpoints whose step is a multiple of this; 0 = none"""


@dataclass
class LogConfig:
    """Metrics and progress."""

    every: int = 10
    """write a metrics.jsonl line every this many steps"""
    progress: bool = True
    """tqdm progress bar on rank 0"""


@dataclass
class RunConfig:
    """A whole `dwm train` run."""

    out: str = "runs/train"
    """run directory"""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)


# ---------------------------------------------------------------- introspection


def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literal following each annotated field in the class body."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - no source (frozen app)
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for a, b in itertools.pairwise(body):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted key, type, default, doc) for every leaf field, in declaration order."""
    out = []
    docs, hints, inst = field_docs(cls), _hints(cls), cls()
    for f in fields(cls):
        t = hints[f.name]
        if is_dataclass(t):
            out += iter_keys(t, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, t, getattr(inst, f.name), docs.get(f.name, "")))
    return out


def help_config() -> str:
    """Every key with its type, default and doc: the text of `dwm train --help-config`."""
    lines = ["Configuration keys (TOML sections or dotted key=value overrides):", ""]
    for key, t, default, doc in iter_keys():
        lines.append(f"  {key} ({t.__name__}, default {_fmt(default)})")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


# ---------------------------------------------------------------- parsing


def _coerce(key: str, t: type, value: Any, from_str: bool) -> Any:
    """value as type t, or a UserError naming the key."""
    bad = UserError(f"config key {key}: expected {t.__name__}, got {value!r}")
    if from_str:
        s = value.strip()
        if t is bool:
            if s.lower() in ("true", "1", "yes", "on"):
                return True
            if s.lower() in ("false", "0", "no", "off"):
                return False
            raise bad
        if t is str:
            return value
        try:
            v = int(s) if t is int else float(s)
        except ValueError:
            try:  # allow "1e6" for an int when it is whole
                f = float(s)
            except ValueError:
                raise bad from None
            if t is int and f.is_integer():
                return int(f)
            raise bad from None
        if t is float and not math.isfinite(v):
            raise bad
        return v
    if t is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise bad
    if t is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad  # pragma: no cover


def _unknown(key: str, cls: type, prefix: str) -> UserError:
    names = [f.name for f in fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return UserError(f"unknown config key {prefix}{key}{hint}; see `dwm train --help-config`")


def _apply_dict(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = _hints(type(obj))
    for k, v in data.items():
        if k not in hints:
            raise _unknown(k, type(obj), prefix)
        t = hints[k]
        if is_dataclass(t):
            if not isinstance(v, dict):
                raise UserError(f"config key {prefix}{k} is a section, got {v!r}")
            _apply_dict(getattr(obj, k), v, f"{prefix}{k}.")
        else:
            if isinstance(v, dict):
                raise UserError(f"config key {prefix}{k} is a value, not a section")
            setattr(obj, k, _coerce(prefix + k, t, v, from_str=False))


def apply_override(cfg: RunConfig, item: str) -> None:
    """Apply one `dotted.key=value` argument."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not key=value (e.g. optim.lr=3e-4)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    obj, prefix = cfg, ""
    for p in parts[:-1]:
        hints = _hints(type(obj))
        if p not in hints or not is_dataclass(hints[p]):
            raise _unknown(p, type(obj), prefix)
        obj, prefix = getattr(obj, p), f"{prefix}{p}."
    name, hints = parts[-1], _hints(type(obj))
    if name not in hints:
        raise _unknown(name, type(obj), prefix)
    if is_dataclass(hints[name]):
        raise UserError(f"config key {key} is a section; set one of its keys, e.g. {key}.<name>=...")
    setattr(obj, name, _coerce(key, hints[name], value, from_str=True))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the TOML file (if any), then the overrides in order. Not yet validated."""
    cfg = RunConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"cannot parse {p}: {e}") from e
        _apply_dict(cfg, data)
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def recipe_path(name: str) -> Path:
    """A shipped recipe (src/dwm/recipes/NAME.toml) by name."""
    return Path(__file__).resolve().parent.parent / "recipes" / f"{name}.toml"


# ---------------------------------------------------------------- TOML output


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def _to_toml(obj: Any, section: str, out: list[str]) -> None:
    nested = []
    lines = []
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            nested.append((f.name, v))
        else:
            lines.append(f"{f.name} = {_fmt(v)}")
    if section:
        out.append(f"\n[{section}]")
    out.extend(lines)
    for name, v in nested:
        _to_toml(v, f"{section}.{name}" if section else name, out)


def to_toml(cfg: RunConfig) -> str:
    out = ["# resolved dwm train configuration"]
    _to_toml(cfg, "", out)
    return "\n".join(out) + "\n"


def to_dict(obj: Any) -> dict[str, Any]:
    return {f.name: to_dict(getattr(obj, f.name)) if is_dataclass(getattr(obj, f.name)) else getattr(obj, f.name)
            for f in fields(obj)}


# ---------------------------------------------------------------- validation


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


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"config key {key}: {value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"config key {key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate_static(cfg: RunConfig) -> None:
    """Checks that need no files."""
    from dwm.train.model import PRESETS

    m, o, t, c, lg, w = cfg.model, cfg.optim, cfg.train, cfg.checkpoint, cfg.log, cfg.weighting
    if m.spec not in PRESETS and not (Path(m.spec).is_dir() or "/" in m.spec or m.spec.startswith(".")):
        raise UserError(f"config key model.spec: unknown preset {m.spec!r} (presets: {', '.join(PRESETS)}; "
                        "or give a local Hugging Face checkpoint directory)")
    _choice("model.attn_implementation", m.attn_implementation, ("sdpa", "eager", "flash_attention_2"))
    _positive("optim.lr", o.lr)
    if not 0 <= o.min_lr_ratio <= 1:
        raise UserError(f"config key optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps < -1:
        raise UserError(f"config key optim.warmup_steps: must be >= 0 or -1 (auto), got {o.warmup_steps}")
    if not 0 <= o.warmup_fraction < 1:
        raise UserError(f"config key optim.warmup_fraction: must be in [0, 1), got {o.warmup_fraction}")
    for k in ("beta1", "beta2"):
        if not 0 <= getattr(o, k) < 1:
            raise UserError(f"config key optim.{k}: must be in [0, 1), got {getattr(o, k)}")
    _positive("optim.eps", o.eps)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    _positive("train.global_batch_tokens", t.global_batch_tokens)
    _positive("train.micro_batch_size", t.micro_batch_size)
    _positive("train.max_steps", t.max_steps, allow_zero=True)
    _positive("train.max_tokens", t.max_tokens, allow_zero=True)
    if t.max_steps == 0 and t.max_tokens == 0:
        raise UserError("no training budget: set train.max_steps or train.max_tokens")
    if t.max_steps and t.max_tokens:
        raise UserError("set only one of train.max_steps and train.max_tokens")
    _positive("train.seed", t.seed, allow_zero=True)
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _choice("train.precision", t.precision, ("auto", "bf16", "fp32", "fp64"))
    _positive("checkpoint.every", c.every, allow_zero=True)
    _positive("checkpoint.keep_last", c.keep_last)
    _positive("checkpoint.keep_every", c.keep_every, allow_zero=True)
    _positive("log.every", lg.every)
    if not cfg.out:
        raise UserError("config key out: the run directory must be set")
    # weighting
    if w.mode not in ("uniform", "dwm"):
        p = Path(w.mode)
        if not (p.is_dir() and (p / "weighting").is_dir()):
            raise UserError(f"config key weighting.mode: {w.mode!r} is not 'uniform', 'dwm' or a run directory "
                            "with a weighting/ folder")
    if w.keep_learning and w.mode in ("uniform", "dwm"):
        raise UserError("weighting.keep_learning needs weighting.mode = a RUN_DIR whose weighting model to replay")
    _choice("weighting.backend", w.backend, ("fd", "exact"))
    _choice("weighting.schedule", w.schedule, ("staged", "interleaved"))
    _choice("weighting.ref_loss", w.ref_loss, ("passage", "target"))
    _choice("weighting.precondition", w.precondition, ("adam", "sgd"))
    for k in ("temperature", "fd_eps", "lr", "grad_clip"):
        _positive(f"weighting.{k}", getattr(w, k), allow_zero=(k == "grad_clip"))
    if not 0 <= w.floor <= 1:
        raise UserError(f"config key weighting.floor: must be in [0, 1], got {w.floor}")
    if not 0 < w.update_fraction <= 1:
        raise UserError(f"config key weighting.update_fraction: must be in (0, 1], got {w.update_fraction}")
    if not 0 <= w.min_ess_fraction <= 1:
        raise UserError(f"config key weighting.min_ess_fraction: must be in [0, 1], got {w.min_ess_fraction}")
    for k in ("ref_batch_size", "stages", "interval", "probe_size"):
        _positive(f"weighting.{k}", getattr(w, k), allow_zero=(k == "probe_size"))
    _positive("weighting.updates_per_stage", w.updates_per_stage, allow_zero=True)
    _positive("weighting.lookahead_lr", w.lookahead_lr, allow_zero=True)
    _positive("weighting.weight_decay", w.weight_decay, allow_zero=True)
    n = w.net
    for k in ("layers", "width", "heads", "max_len"):
        _positive(f"weighting.net.{k}", getattr(n, k))
    if n.width % n.heads:
        raise UserError(f"weighting.net.width ({n.width}) must be divisible by weighting.net.heads ({n.heads})")
    if not 0 <= n.dropout < 1:
        raise UserError(f"config key weighting.net.dropout: must be in [0, 1), got {n.dropout}")


def validate(cfg: RunConfig, world_size: int = 1, check_paths: bool = True) -> Plan | None:
    """Reject every invalid value with a UserError; with check_paths, read the data's meta.json and return the Plan
    (batch sizes, accumulation, steps) for this world size."""
    validate_static(cfg)
    if not check_paths:
        return None
    from dwm.data.dataset import read_meta

    meta = read_meta(cfg.data.dir)
    if cfg.data.split not in meta["splits"]:
        raise UserError(f"config key data.split: {cfg.data.dir} has no split {cfg.data.split!r}")
    if cfg.data.selection and not Path(cfg.data.selection).is_file():
        raise UserError(f"config key data.selection: {cfg.data.selection} does not exist")
    w = cfg.weighting
    if (w.mode == "dwm" or w.keep_learning) and not Path(w.reference).is_file():
        raise UserError(f"config key weighting.reference: {w.reference} does not exist (`dwm target build`)")
    return make_plan(cfg, int(meta["seq_len"]), int(meta["vocab_size"]), world_size)


def make_plan(cfg: RunConfig, seq_len: int, vocab_size: int, world_size: int) -> Plan:
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
