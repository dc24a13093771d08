"""Synthetic prepared directories for tests, benchmarks and toy runs.

`make_synthetic_prepared` writes a complete, valid `dwm prepare` directory (format dwm-prepared/1) without a corpus:
each domain draws sentences from its own small word list, a real byte-level BPE is trained on that text with
`tokenizers` (so tokenizer.json loads anywhere), and every document becomes one row (`packing = "doc"`): truncated
to seq_len, or padded after its EOS when shorter, so tests also see padded rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_WORDS = {  # one word list per domain, split on use
    0: "the cat sat on a mat and looked at the small red ball near the door",
    1: "market prices rose sharply as investors sold bonds and bought shares today",
    2: "def return import class self value list print range index for while",
    3: "stars orbit galaxies through dark matter halos over billions of years",
}
EOS, PAD = "<|endoftext|>", "<pad>"


def _words_for(k: int, rng: np.random.Generator) -> list[str]:
    if k in _WORDS:
        return _WORDS[k].split()
    return ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 7))) for _ in range(14)]


def _document(words: list[str], rng: np.random.Generator, n_words: int) -> str:
    return " ".join(rng.choice(words, size=n_words)).capitalize() + "."


def train_tiny_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE with EOS and PAD specials (ids 0 and 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def make_synthetic_prepared(out_dir: str | Path, n_train: int = 64, n_val: int = 16, seq_len: int = 32,
                            vocab_size: int = 300, domains: tuple[str, ...] = ("a", "b"), seed: int = 0) -> Path:
    """Write a prepared dir with `n_train`/`n_val` rows of `seq_len` tokens; returns its path.

    vocab_size is the BPE's target (at least 258: 256 bytes + 2 specials); meta.json records the real size.
    Deterministic in `seed`. Score column `quality` is a float64 per row (domain-dependent mean).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    doms = sorted(domains)
    words = {d: _words_for(k, rng) for k, d in enumerate(doms)}
    splits = {"train": n_train, "val": n_val}
    docs: dict[str, list[tuple[str, str]]] = {}
    for split, n in splits.items():
        dom_of = [doms[i % len(doms)] for i in range(n)]
        rng.shuffle(dom_of)
        # lengths from well under to well over seq_len tokens (a word is ~1-3 tokens)
        docs[split] = [(d, _document(words[d], rng, int(rng.integers(max(2, seq_len // 6), seq_len + 4))))
                       for d in dom_of]
    texts = [t for split in docs.values() for _, t in split] or ["empty"]
    tok = train_tiny_tokenizer(texts, max(vocab_size, 258))
    tok.save(str(out / "tokenizer.json"))
    eos_id, pad_id = tok.token_to_id(EOS), tok.token_to_id(PAD)
    real_vocab = tok.get_vocab_size()
    dtype = "uint16" if real_vocab < 65536 else "uint32"
    meta_splits, stats_tokens = {}, {d: 0 for d in doms}
    for split, rows in docs.items():
        arr = np.full((len(rows), seq_len), pad_id, dtype=dtype)
        n_tok = np.zeros(len(rows), dtype=np.int32)
        for i, (d, text) in enumerate(rows):
            ids = (tok.encode(text).ids + [eos_id])[:seq_len]
            arr[i, : len(ids)] = ids
            n_tok[i] = len(ids)
            stats_tokens[d] += len(ids)
        arr.tofile(out / f"{split}.bin")
        dom_idx = np.array([doms.index(d) for d, _ in rows], dtype=np.int64)
        table = pa.table({
            "sample_id": pa.array(np.arange(len(rows), dtype=np.int64)),
            "doc_id": pa.array([f"{split}-{d}-{i}" for i, (d, _) in enumerate(rows)], pa.string()),
            "domain": pa.array([d for d, _ in rows], pa.string()),
            "source": pa.array([f"synthetic_{d}" for d, _ in rows], pa.string()),
            "n_tokens": pa.array(n_tok, pa.int32()),
            "quality": pa.array(rng.normal(dom_idx.astype(np.float64), 1.0), pa.float64()),
        })
        pq.write_table(table, out / f"{split}.parquet")
        meta_splits[split] = {"n_samples": len(rows), "n_docs": len(rows)}
    meta = {"format": "dwm-prepared/1", "seq_len": seq_len, "vocab_size": real_vocab, "dtype": dtype,
            "pad_id": pad_id, "eos_id": eos_id, "packing": "doc", "domains": doms, "score_columns": ["quality"],
            "splits": meta_splits, "tokenizer": "tokenizer.json", "synthetic": True, "seed": seed}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    n_docs = sum(splits.values())
    (out / "stats.json").write_text(json.dumps({
        "docs_in": n_docs, "docs_written": n_docs, "docs_skipped": 0, "skipped": {},
        "tokens": stats_tokens, "bytes": {d: sum(len(t.encode()) for s in docs.values() for dd, t in s if dd == d)
                                          for d in doms}}, indent=2))
    return out
