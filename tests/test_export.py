"""`dwm export`: the HF directory reproduces the checkpoint's logits and the run's tokenization, offline."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import make_passages, make_run

from dwm.cli import main
from dwm.errors import UserError
from dwm.eval.export import export_run, resolve_checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export"), make_passages(12, seed=2), train_steps=5)


def test_export_round_trip(run_dir, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()

    ckpt, name = resolve_checkpoint(run_dir)
    assert name == "step_00000010"
    ref = LlamaForCausalLM.from_pretrained(ckpt / "model").eval()
    exp = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, exp(ids).logits)

    raw = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(out)
    for text in ["the cat sat by the river", " leading space", "Ünïcode, punctuation!  two  spaces", ""]:
        assert tok.encode(text) == raw.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == raw.token_to_id("<|endoftext|>")
    assert tok.pad_token == "<pad>" and tok.pad_token_id == raw.token_to_id("<pad>")
    assert tok.model_max_length == exp.config.max_position_embeddings == 64
    assert exp.config.eos_token_id == tok.eos_token_id and exp.config.pad_token_id == tok.pad_token_id
    assert len(tok) == raw.get_vocab_size()


def test_export_named_checkpoint_and_errors(run_dir, tmp_path, capsys):
    info = export_run(run_dir, tmp_path / "a", checkpoint="step_00000010")
    assert info["checkpoint"] == "step_00000010"
    with pytest.raises(UserError, match="no model"):
        export_run(run_dir, tmp_path / "b", checkpoint="step_99999999")
    with pytest.raises(UserError, match="run directory not found"):
        export_run(tmp_path / "nope", tmp_path / "c")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(UserError, match="no checkpoint"):
        export_run(empty, tmp_path / "d")
    # through the CLI: exit code 2 and one line, no traceback
    capsys.readouterr()
    assert main(["export", str(empty), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dwm export: error: no checkpoint") and "Traceback" not in err
    # a tokenizer without an end-of-text token cannot be exported with named roles
    from tokenizers import Tokenizer, models

    bad = tmp_path / "bad_run"
    (bad / "checkpoints").mkdir(parents=True)
    (bad / "checkpoints" / "LATEST").write_text("step_00000010\n")
    (bad / "checkpoints" / "step_00000010").symlink_to(run_dir / "checkpoints" / "step_00000010")
    Tokenizer(models.BPE()).save(str(bad / "tokenizer.json"))
    with pytest.raises(UserError, match="no end-of-text token"):
        export_run(bad, tmp_path / "f")
