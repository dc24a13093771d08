"""Model presets, parameter counts, local checkpoints and vocab checks."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from dwm.errors import UserError
from dwm.train.model import PRESETS, build_model, count_params, llama_config


def test_tiny_shape_and_seed_determinism():
    a = build_model("tiny", 300, seed=1, max_seq_len=32)
    b = build_model("tiny", 300, seed=1, max_seq_len=32)
    c = build_model("tiny", 300, seed=2, max_seq_len=32)
    cfg = a.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (2, 32, 4, 64)
    assert cfg.tie_word_embeddings and a.lm_head.weight is a.model.embed_tokens.weight
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_seed_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("tiny", 300, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_cpu_preset_sizes():
    assert 4.5e6 < count_params(build_model("cpu-small", 8192, seed=0)) < 6e6
    with torch.device("meta"):
        base = LlamaForCausalLM(llama_config(PRESETS["cpu-base"], 8192))
        p370 = LlamaForCausalLM(llama_config(PRESETS["paper-370m"], 32000))
        p13 = LlamaForCausalLM(llama_config(PRESETS["paper-1.3b"], 32000))
    assert 18e6 < count_params(base) < 23e6
    assert 330e6 < count_params(p370) < 420e6
    assert 1.2e9 < count_params(p13) < 1.45e9
    assert (p13.config.num_hidden_layers, p13.config.hidden_size, p13.config.intermediate_size) == (24, 2048, 5504)


def test_max_positions_cover_seq_len():
    m = build_model("tiny", 300, max_seq_len=4096)
    assert m.config.max_position_embeddings >= 4096


def test_local_checkpoint_roundtrip_and_vocab_check(tmp_path):
    src = build_model("tiny", 300, seed=0)
    src.save_pretrained(tmp_path / "m")
    loaded = build_model(str(tmp_path / "m"), 300)
    for (n, p), (_, q) in zip(src.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(UserError, match="vocab_size 300"):
        build_model(str(tmp_path / "m"), 512)


def test_unknown_spec():
    with pytest.raises(UserError, match="unknown model"):
        build_model("gpt-17", 300)
