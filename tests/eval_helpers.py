"""Shared builders for the eval/export/harness tests: a tiny trained LLaMA run directory and LAMBADA passages.

The model is overfit for a few seconds on the passages themselves so that some targets are predicted greedily
(otherwise every accuracy in the comparisons would trivially be 0).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from dwm.testing import train_tiny_tokenizer

WORDS = [
    "the", "cat", "dog", "house", "garden", "river", "stone", "light", "night", "morning", "king", "queen",
    "ship", "harbour", "letter", "window", "forest", "bread", "candle", "winter", "summer", "road", "mountain",
    "village", "doctor", "captain", "sister", "brother",
]


def make_passages(n: int = 20, seed: int = 0) -> list[str]:
    """Passages whose last word also occurs earlier (LAMBADA-like), of varying length (some > 64 tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        target = WORDS[i % len(WORDS)]
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 45))]
        words.insert(rng.randrange(len(words)), target)
        if i % 5 == 0:
            words[2] = words[2] + ","  # punctuation inside the context
        out.append(" ".join(words + ["and", "then", "the", target]))
    return out


def write_jsonl(passages: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in passages)
    return path


def make_model(vocab_size: int, max_len: int = 64, seed: int = 0):
    """The `tiny` preset, its context cut to `max_len` so that long passages exercise left truncation."""
    from dwm.train.model import build_model

    model = build_model("tiny", vocab_size, seed=seed)
    model.config.max_position_embeddings = max_len  # RoPE does not depend on it: same weights, same logits
    return model


def overfit(model, tok, texts: list[str], steps: int = 60, seq: int = 64) -> None:
    """A few Adam steps on the passages so the greedy predictions hit some targets."""
    eos = tok.token_to_id("<|endoftext|>")
    ids = [i for t in texts for i in tok.encode(t).ids + [eos]]
    rows = torch.tensor([ids[i:i + seq] for i in range(0, len(ids) - seq, seq // 2)], dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(rows, labels=rows).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_run(root: Path, passages: list[str], step: int = 10, train_steps: int = 60,
             tokenizer_json: Path | None = None, data_dir: Path | None = None, name: str = "run") -> Path:
    """A run directory following docs/ARCHITECTURE.md: tokenizer.json, config.toml, checkpoints/LATEST -> model.

    The tokenizer is `tokenizer_json` (e.g. a prepared dir's) or one trained on the passages; config.toml names
    `data_dir` as data.dir when given.
    """
    from tokenizers import Tokenizer

    run = root / name
    tok = Tokenizer.from_file(str(tokenizer_json)) if tokenizer_json else train_tiny_tokenizer(passages, 300)
    model = make_model(tok.get_vocab_size())
    overfit(model, tok, passages, steps=train_steps)
    ckpt = f"step_{step:08d}"
    (run / "checkpoints" / ckpt).mkdir(parents=True)
    model.save_pretrained(run / "checkpoints" / ckpt / "model")
    (run / "checkpoints" / "LATEST").write_text(ckpt + "\n")
    tok.save(str(run / "tokenizer.json"))
    data = f'[data]\ndir = "{data_dir}"\n' if data_dir else ""
    (run / "config.toml").write_text(f'{data}[train]\nglobal_batch_tokens = 128\n')
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": step, "tokens_seen": step * 100 + 1, "loss": 5.0}) + "\n")
    return run
