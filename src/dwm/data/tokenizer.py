"""Tokenizers for `dwm prepare`: train a byte-level BPE, or load a tokenizer.json / HF tokenizer directory.

Byte-level BPE (GPT-2 style) because it never produces <unk>: every document, in any script or with any
stray byte, round-trips. Special tokens are "<|endoftext|>" (EOS, appended after every document) and
"<|pad|>" (fills the end of a short sample). A loaded tokenizer without a pad token pads with EOS: the
per-sample `n_tokens` column, not the pad id, says where the real tokens end.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dwm.errors import UserError

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with EOS and PAD as special tokens (ids 0 and 1)."""
    if vocab_size < 258 + 2:
        raise UserError(f"--vocab-size must be at least 260 (256 bytes + 2 special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _special_from_config(d: Path, key: str) -> str | None:
    """eos_token / pad_token from an HF tokenizer_config.json or special_tokens_map.json (str or dict form)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = d / name
        if f.is_file():
            try:
                v = json.loads(f.read_text()).get(key)
            except ValueError:
                continue
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                return v
    return None


def load_tokenizer(path: str | Path) -> tuple[Tokenizer, int, int]:
    """Load a tokenizer.json file or an HF tokenizer directory -> (tokenizer, eos_id, pad_id)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"tokenizer path does not exist: {p}")
    cfg_dir = p if p.is_dir() else p.parent
    try:
        if p.is_file():
            tok = Tokenizer.from_file(str(p))
        elif (p / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(p / "tokenizer.json"))
        else:  # a slow-only HF dir (vocab.json + merges.txt, sentencepiece ...): let transformers convert it
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True, use_fast=True)
            if not getattr(hf, "is_fast", False):
                raise UserError(f"{p}: tokenizer has no fast (tokenizers) version")
            tok = hf.backend_tokenizer
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers/transformers raise plain Exception subclasses
        raise UserError(f"{p}: cannot load tokenizer ({type(e).__name__}: {e})") from None
    tok.no_truncation()
    tok.no_padding()
    eos_tok = EOS if tok.token_to_id(EOS) is not None else _special_from_config(cfg_dir, "eos_token")
    if eos_tok is None or tok.token_to_id(eos_tok) is None:
        for cand in ("</s>", "<eos>", "<|end_of_text|>", "<|im_end|>"):
            if tok.token_to_id(cand) is not None:
                eos_tok = cand
                break
        else:
            raise UserError(f"{p}: tokenizer has no EOS token ({EOS}, or eos_token in tokenizer_config.json)")
    eos_id = tok.token_to_id(eos_tok)
    pad_tok = PAD if tok.token_to_id(PAD) is not None else _special_from_config(cfg_dir, "pad_token")
    pad_id = tok.token_to_id(pad_tok) if pad_tok else None
    return tok, int(eos_id), int(eos_id if pad_id is None else pad_id)


def vocab_size(tok: Tokenizer) -> int:
    """Number of ids the tokenizer can emit (with added tokens): what the LM's embedding needs."""
    return int(tok.get_vocab_size(with_added_tokens=True))


def choose_dtype(n_vocab: int) -> np.dtype:
    """uint16 when every id fits in it (vocab <= 65535), else uint32: halves the memmap for small vocabs."""
    return np.dtype(np.uint16) if n_vocab <= 65535 else np.dtype(np.uint32)


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (the caller appends EOS). encode_batch_fast skips offsets."""
    fast = getattr(tok, "encode_batch_fast", None)
    encs = (fast or tok.encode_batch)(texts, add_special_tokens=False)
    return [e.ids for e in encs]
