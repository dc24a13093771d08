"""Language models: LLaMA presets, or any supported Hugging Face causal LM from a local directory.

`model.spec=DIR` reads DIR/config.json and builds the model with transformers' AutoConfig /
AutoModelForCausalLM, for the architectures in `HF_MODEL_TYPES` (llama, qwen2, gpt2, gpt_neox, olmo): from its
weights (continued pretraining) or from scratch with the directory's shape (`model.init`: "auto" loads the weights
when DIR has any, else initialises from scratch, seeded and without touching the global RNG, like the presets).
The config is checked before any model memory is allocated: the architecture, the vocabulary (at least the data's;
a pretrained model's embedding is often padded past its tokenizer) and the positions (at least train.seq_len).

The paper's Table 7 (exact model dimensions) is not available here, so the two paper-scale presets use assumed,
documented dimensions: `paper-1.3b` is Sheared-LLaMA-1.3B's shape (24 layers, hidden 2048, 16 heads, MLP 5504)
and `paper-370m` a common 370M LLaMA shape (24 layers, hidden 1024, 16 heads, MLP 2816). The CPU presets are
sized for laptops: `cpu-small` is ~5M parameters and `cpu-base` ~20M with an 8k vocabulary (tied embeddings, so
the embedding matrix is not counted twice); `tiny` exists for tests only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dwm.config import did_you_mean
from dwm.errors import UserError, read_json_object

# Hugging Face architectures (config.json "model_type") that `model.spec=DIR` builds; each is tested end to end
# (training, both hypergradient backends, export, activation checkpointing) in tests/test_hf_models.py.
HF_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "gpt2", "gpt_neox", "olmo")
WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                 "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Preset:
    """Shape of a LLaMA model; vocab_size comes from the data's tokenizer."""

    layers: int
    hidden: int
    heads: int
    mlp: int
    max_positions: int = 2048
    tie_embeddings: bool = True
    kv_heads: int | None = None
    rope_theta: float = 10000.0


PRESETS: dict[str, Preset] = {
    # tests: a model that trains in milliseconds
    "tiny": Preset(layers=2, hidden=32, heads=4, mlp=64, max_positions=512),
    # ~1.4M params with an 8192 vocab (1.05M of them the tied embedding): the learner of size-transfer experiments
    "cpu-mini": Preset(layers=2, hidden=128, heads=4, mlp=344, max_positions=1024),
    # ~5.3M params with an 8192 vocab (2.1M of them the tied embedding)
    "cpu-small": Preset(layers=4, hidden=256, heads=4, mlp=688, max_positions=1024),
    # ~20.8M params with an 8192 vocab
    "cpu-base": Preset(layers=10, hidden=384, heads=6, mlp=1024, max_positions=1024),
    # assumed (paper's Table 7 unavailable): a standard 370M LLaMA shape
    "paper-370m": Preset(layers=24, hidden=1024, heads=16, mlp=2816, max_positions=4096, tie_embeddings=False),
    # assumed: Sheared-LLaMA-1.3B's shape
    "paper-1.3b": Preset(layers=24, hidden=2048, heads=16, mlp=5504, max_positions=4096, tie_embeddings=False),
}


def llama_config(preset: Preset, vocab_size: int, *, max_seq_len: int = 0) -> LlamaConfig:
    """The HF config of a preset; max_position_embeddings is raised to max_seq_len when that is longer."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden,
        intermediate_size=preset.mlp,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads or preset.heads,
        max_position_embeddings=max(preset.max_positions, max_seq_len),
        tie_word_embeddings=preset.tie_embeddings,
        rope_theta=preset.rope_theta,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        use_cache=False,
    )


def build_model(spec: str, vocab_size: int, *, attn_implementation: str = "sdpa",
                dtype: torch.dtype = torch.float32, seed: int | None = None,
                max_seq_len: int = 0, init: str = "auto") -> torch.nn.Module:
    """A preset name (fresh init, deterministic when `seed` is given, without touching the global RNG) or a local
    HF directory (see the module docstring; `init` is "auto", "scratch" or "pretrained")."""
    if spec in PRESETS:
        if init == "pretrained":
            raise UserError(f"model.init=pretrained needs a Hugging Face directory with weights; {spec!r} is a "
                            "preset (always initialised from scratch)")
        cfg = llama_config(PRESETS[spec], vocab_size, max_seq_len=max_seq_len)
        cfg._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = LlamaForCausalLM(cfg)
        return model.to(dtype)
    path = Path(spec)
    cfg = hf_config(path, vocab_size, max_seq_len)
    pretrained = has_weights(path)
    if init == "pretrained" and not pretrained:
        raise UserError(f"model.init=pretrained but {path} has no weights ({', '.join(WEIGHT_FILES)}); "
                        "use model.init=scratch (or auto) to train its architecture from scratch")
    from transformers import AutoModelForCausalLM

    if init == "scratch" or not pretrained:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
        model = model.to(dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
        except Exception as e:
            raise UserError(f"cannot load model from {path}: {str(e).splitlines()[0] if str(e) else e!r}") from e
    model.config.use_cache = False
    return model


def has_weights(path: str | Path) -> bool:
    """Whether a HF model directory holds weights (safetensors or PyTorch, single file or sharded)."""
    return any((Path(path) / f).is_file() for f in WEIGHT_FILES)


def hf_config(path: Path, vocab_size: int, max_seq_len: int = 0) -> Any:
    """DIR/config.json as a transformers config, checked (architecture, vocab, positions) before any model memory
    is allocated; every problem is a one-line UserError."""
    if not path.is_dir():
        raise UserError(f"unknown model {str(path)!r}: not a preset ({', '.join(PRESETS)}) "
                        "nor a local Hugging Face directory")
    cfile = path / "config.json"
    if not cfile.is_file():
        raise UserError(f"model directory {path} has no config.json (a Hugging Face model directory needs one)")
    raw = read_json_object(cfile)
    mtype = raw.get("model_type")
    if not isinstance(mtype, str) or not mtype:
        raise UserError(f"{cfile} names no \"model_type\" (supported: {', '.join(HF_MODEL_TYPES)})")
    if mtype not in HF_MODEL_TYPES:
        raise UserError(f"{cfile}: model_type {mtype!r} is not supported (supported causal LMs: "
                        f"{', '.join(HF_MODEL_TYPES)}){did_you_mean(mtype, HF_MODEL_TYPES)}")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a malformed field: transformers raises many kinds
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read model config {cfile}: {msg}") from None
    n_vocab = int(cfg.vocab_size)
    if n_vocab < vocab_size:
        raise UserError(f"model {path} has vocab_size {n_vocab} but the data's tokenizer has {vocab_size}: "
                        "prepare the data with the model's tokenizer")
    key = "n_positions" if mtype == "gpt2" else "max_position_embeddings"
    positions = getattr(cfg, key, None)
    if positions is not None and max_seq_len > int(positions):
        raise UserError(f"model {path} supports {positions} positions ({key} in config.json) < train seq_len "
                        f"{max_seq_len}: prepare shorter samples or raise {key}")
    cfg.use_cache = False
    return cfg


def tied_parameter_names(model: torch.nn.Module) -> list[set[str]]:
    """Groups of parameter names that share one tensor (tied input/output embeddings: "lm_head.weight" and
    "model.embed_tokens.weight" for LLaMA, "lm_head.weight" and "transformer.wte.weight" for GPT-2, ...);
    save_pretrained writes one name of each group."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


def saved_state_dict(model: torch.nn.Module, model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a save_pretrained directory under `model`'s own parameter names: transformers renames some
    on saving (GPT-NeoX's lm_head is written as embed_out) and back on loading, so the directory is read the way
    from_pretrained reads it."""
    dtype = next(model.parameters()).dtype
    try:
        loaded = type(model).from_pretrained(Path(model_dir), dtype=dtype)
    except Exception as e:
        raise UserError(f"cannot load model from {model_dir}: {str(e).splitlines()[0] if str(e) else e!r}") from e
    return loaded.state_dict()


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding is counted once)."""
    return sum(p.numel() for p in model.parameters())


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward (non-reentrant checkpoints: they work with autograd.grad,
    backward(inputs=...) and double backward, which the bi-level update uses)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
