"""LLaMA-style language models: named presets or a local Hugging Face checkpoint (continued pretraining).

The paper's Table 7 (exact model dimensions) is not available here, so the two paper-scale presets use assumed,
documented dimensions: `paper-1.3b` is Sheared-LLaMA-1.3B's shape (24 layers, hidden 2048, 16 heads, MLP 5504)
and `paper-370m` a common 370M LLaMA shape (24 layers, hidden 1024, 16 heads, MLP 2816). The CPU presets are
sized for laptops: `cpu-small` is ~5M parameters and `cpu-base` ~20M with an 8k vocabulary (tied embeddings, so
the embedding matrix is not counted twice); `tiny` exists for tests only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dwm.errors import UserError


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
                max_seq_len: int = 0) -> LlamaForCausalLM:
    """A preset name (fresh init, deterministic when `seed` is given, without touching the global RNG) or a local
    HF checkpoint directory (continued pretraining; its vocab must equal the data's)."""
    if spec in PRESETS:
        cfg = llama_config(PRESETS[spec], vocab_size, max_seq_len=max_seq_len)
        cfg._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = LlamaForCausalLM(cfg)
        return model.to(dtype)
    path = Path(spec)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise UserError(f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}) "
                        "nor a local Hugging Face directory with config.json")
    try:
        cfg = LlamaConfig.from_pretrained(path)
    except Exception as e:  # malformed config.json
        raise UserError(f"cannot read model config in {path}: {e}") from e
    if cfg.vocab_size != vocab_size:
        raise UserError(f"model {path} has vocab_size {cfg.vocab_size} but the data's tokenizer has {vocab_size}: "
                        "prepare the data with the model's tokenizer")
    if max_seq_len > cfg.max_position_embeddings:
        raise UserError(f"model {path} supports {cfg.max_position_embeddings} positions < seq_len {max_seq_len}")
    try:
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except Exception as e:
        raise UserError(f"cannot load model from {path}: {e}") from e
    model.config.use_cache = False
    return model


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
