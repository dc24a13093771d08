"""`dwm export RUN_DIR --out HF_DIR [--checkpoint NAME]`: a run's model as a self-contained Hugging Face directory.

The result loads with `AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained` and
`lm_eval --model hf --model_args pretrained=HF_DIR`, offline and without dwm installed. The checkpoint's model is
already an HF save_pretrained dir; what a run lacks is a transformers tokenizer (a run keeps only the raw
`tokenizers` file), so the export wraps RUN_DIR/tokenizer.json in a PreTrainedTokenizerFast with its EOS/PAD
roles named and `model_max_length` set to the model's context, and writes both with save_pretrained.

BOS: the run's tokenizer.json carries the data's BOS policy in its post-processor (dwm.data.tokenizer): when it
puts a BOS before every text, that token is the export's bos_token and add_bos_token is true, so AutoTokenizer of
the export encodes text exactly as training and `dwm eval` did; otherwise add_bos_token is false, and a tokenizer
without a BOS token exports bos_token_id None (the model config's default, e.g. LLaMA's 1, is cleared).

Also the run-directory helpers the evaluator shares: `resolve_checkpoint`, `load_run_model`, `load_run_tokenizer`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dwm.data.tokenizer import added_specials
from dwm.errors import UserError

# Special-token spellings, most specific first. A run's tokenizer.json names no roles, so they are recognised.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")
_BOS_NAMES = ("<s>", "<bos>", "<|bos|>", "[BOS]")
_UNK_NAMES = ("<unk>", "<|unk|>", "[UNK]")


def resolve_checkpoint(run_dir: str | Path, name: str | None = None) -> tuple[Path, str]:
    """(checkpoint dir, its name): `name`, else the one RUN_DIR/checkpoints/LATEST names. UserError if absent."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    ckpts = run / "checkpoints"
    if name is None:
        latest = ckpts / "LATEST"
        if not latest.is_file():
            raise UserError(f"no checkpoint in {run} (missing {latest}); has training written one yet?")
        name = latest.read_text(encoding="utf-8").strip()
        if not name:
            raise UserError(f"{latest} is empty")
    ckpt = ckpts / name
    if not (ckpt / "model" / "config.json").is_file():
        have = sorted(p.name for p in ckpts.iterdir() if (p / "model").is_dir()) if ckpts.is_dir() else []
        raise UserError(f"checkpoint {name!r} has no model in {run} (expected {ckpt / 'model'}/config.json); "
                        f"available: {', '.join(have) or 'none'}")
    return ckpt, name


def load_run_model(ckpt_dir: str | Path, device: str = "cpu") -> Any:
    """The checkpoint's LlamaForCausalLM (or whatever causal LM it holds), in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(Path(ckpt_dir) / "model")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model in {Path(ckpt_dir) / 'model'}: {e}") from None
    return model.to(device).eval()


def _find(tok: Any, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if tok.token_to_id(n) is not None), None)


def load_run_tokenizer(run_dir: str | Path, max_length: int | None = None) -> Any:
    """RUN_DIR/tokenizer.json as a transformers PreTrainedTokenizerFast with eos/pad (and bos/unk if present),
    adding a BOS to each text exactly when the run's tokenizer does (the data's BOS policy)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = Path(run_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"run has no tokenizer: {path} is missing")
    try:
        raw = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception on a malformed file
        raise UserError(f"cannot read tokenizer {path}: {e}") from None
    eos = _find(raw, _EOS_NAMES)
    if eos is None:
        raise UserError(f"{path} has no end-of-text token (looked for {', '.join(_EOS_NAMES)})")
    kwargs: dict[str, Any] = {"eos_token": eos, "pad_token": _find(raw, _PAD_NAMES) or eos}
    for role, names in (("bos_token", _BOS_NAMES), ("unk_token", _UNK_NAMES)):
        found = _find(raw, names)
        if found is not None:
            kwargs[role] = found
    prefix, suffix = added_specials(raw)
    if len(prefix) > 1 or suffix:
        raise UserError(f"{path}: its post-processor adds {prefix} before and {suffix} after each text; "
                        "only a single BOS before it is supported (prepare the data again)")
    if prefix:
        kwargs["bos_token"] = raw.id_to_token(prefix[0])
    kwargs["add_bos_token"] = bool(prefix)
    kwargs["add_eos_token"] = False
    if max_length is not None:
        kwargs["model_max_length"] = int(max_length)
    return PreTrainedTokenizerFast(tokenizer_object=raw, **kwargs)


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str | None = None) -> dict[str, Any]:
    """Write the checkpoint's model (safetensors) and tokenizer to `out_dir`; returns what was exported."""
    ckpt, name = resolve_checkpoint(run_dir, checkpoint)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out exists and is not a directory: {out}")
    model = load_run_model(ckpt)
    tok = load_run_tokenizer(run_dir, max_length=getattr(model.config, "max_position_embeddings", None))
    # Name the special tokens in the model config too, so generation and lm-eval see the same ids.
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = tok.bos_token_id  # None without a BOS token (never the architecture's default)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # tokenizer.json's post-processor adds the BOS (or not); say so in tokenizer_config.json too, for readers that
    # go by the flag (transformers does not write it for a generic fast tokenizer)
    tcfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8"))
    tcfg.update(add_bos_token=bool(tok.add_bos_token), add_eos_token=False)
    tcfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"run_dir": str(run_dir), "checkpoint": name, "out": str(out), "eos_token": tok.eos_token,
            "pad_token": tok.pad_token, "bos_token": tok.bos_token, "add_bos_token": bool(tok.add_bos_token),
            "vocab_size": len(tok)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run directory (dwm train --out)")
    p.add_argument("--out", required=True, help="directory to write the Hugging Face model + tokenizer to")
    p.add_argument("--checkpoint", default=None, help="checkpoint name (default: checkpoints/LATEST)")


def run(args: argparse.Namespace) -> int:
    info = export_run(args.run_dir, args.out, args.checkpoint)
    print(f"exported {info['run_dir']} checkpoint {info['checkpoint']} -> {info['out']} "
          f"(vocab {info['vocab_size']}, eos {info['eos_token']!r}, pad {info['pad_token']!r})")
    return 0
