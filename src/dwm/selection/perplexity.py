"""`perplexity`: score every document by a reference LM's mean token NLL (log perplexity) and keep a band:
`lowest` (CCNet's head: the most fluent / reference-like text, the default), `middle` (closest to the median,
Marion et al. 2023's best band for pretraining) or `highest`.

The reference LM is a `dwm train` run directory (its newest checkpoint) or a local Hugging Face causal-LM
directory. When its tokenizer is the prepared data's (a dwm run trained on the same directory), the rows are
scored as they are (each row is a sample as training sees it; a document's NLL is the token-weighted mean over its
rows). Otherwise the document text is decoded and re-tokenized with the LM's tokenizer, scored in windows of
`--max-length` tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dwm.data.tokenizer import describe_tokenizer, tokenizer_fingerprint
from dwm.errors import UserError
from dwm.progress import Progress
from dwm.selection.method import SelectionMethod
from dwm.selection.pool import Pool, shard_rows, shard_texts

BANDS = ("lowest", "middle", "highest")


@dataclass
class PerplexityOptions:
    model: str = ""
    band: Literal["lowest", "middle", "highest"] = "lowest"
    batch_size: int = 16
    max_length: int = 512


def load_reference_lm(path: str | Path, device: str):
    """(model, tokenizer_file_or_None, hf_tokenizer_or_None): a dwm run directory or a local HF model directory."""
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if (p / "checkpoints" / "LATEST").is_file():
        model_dir = p / "checkpoints" / (p / "checkpoints" / "LATEST").read_text().strip() / "model"
        tok_file = p / "tokenizer.json"
    elif (p / "config.json").is_file():
        model_dir, tok_file = p, p / "tokenizer.json"
    else:
        raise UserError(f"--ref-model {p}: neither a dwm run directory (checkpoints/LATEST) nor a local Hugging "
                        "Face model directory (config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                     dtype=torch.float32).to(device).eval()
    except Exception as e:
        raise UserError(f"--ref-model {p}: cannot load a causal LM from {model_dir} ({e})") from e
    return model, model_dir, (tok_file if tok_file.is_file() else None)


def _row_nll(model, rows: np.ndarray, n_tok: np.ndarray, bs: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """(sum of token NLLs, predicted tokens) per row."""
    import torch

    from dwm.data.batch import Batch
    from dwm.nn.losses import nll_no_grad

    def batches():
        for i in range(0, len(rows), bs):
            ids = torch.from_numpy(rows[i:i + bs].astype(np.int64)).to(device)
            nt = torch.from_numpy(n_tok[i:i + bs].astype(np.int64)).to(device)
            yield Batch(ids, nt, nt, nt)  # the loss reads input_ids and n_tokens only

    mean = nll_no_grad(model, batches()).double().cpu().numpy() if len(rows) else np.zeros(0)
    k = np.maximum(n_tok - 1, 0)
    return mean * k, k


def score(pool: Pool, opts: PerplexityOptions, device: str = "cpu") -> dict[str, Any]:
    if not opts.model:
        raise UserError("--method perplexity needs --ref-model (a dwm run directory or a local HF model)")
    if opts.band not in BANDS:
        raise UserError(f"--band must be one of {', '.join(BANDS)}, not {opts.band!r}")
    model, model_dir, tok_file = load_reference_lm(opts.model, device)
    data_tok = pool.dir / "tokenizer.json"
    same = tok_file is not None and tokenizer_fingerprint(tok_file) == tokenizer_fingerprint(data_tok)
    if not same:
        if tok_file is None and not _has_hf_tokenizer(model_dir):
            raise UserError(f"--ref-model {opts.model}: no tokenizer to re-tokenize the text with (neither "
                            f"tokenizer.json nor tokenizer_config.json in {model_dir}); the data's is "
                            f"{describe_tokenizer(pool.dir / 'tokenizer.json')}")
        print(f"dwm select: --ref-model tokenizer {describe_tokenizer(tok_file) if tok_file else model_dir} differs "
              f"from the data's {describe_tokenizer(pool.dir / 'tokenizer.json')}: re-tokenizing the text",
              file=sys.stderr)
    out = []
    shards = list(pool.shards())
    bar = Progress("dwm select: perplexity scoring", total=len(shards), unit="shard")
    for shard in shards:
        if same:
            s, c = _row_nll(model, shard_rows(shard), shard.row_tokens, opts.batch_size, device)
            starts = shard.unit_rows[:-1]
            out.append(np.add.reduceat(s, starts) / np.maximum(np.add.reduceat(c, starts), 1))
        else:
            out.append(_text_nll(model, model_dir, shard_texts(shard), opts, device, tok_file))
        bar.update(1)
    bar.close()
    nll = np.concatenate(out)
    return {"scores": nll, "eligible": np.isfinite(nll),
            "settings": {"model": str(Path(opts.model).resolve()), "band": opts.band,
                         "tokenization": "prepared rows" if same else "re-tokenized text"}}


def _has_hf_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def _text_nll(model, model_dir: Path, texts: list[str], opts: PerplexityOptions, device: str,
              tok_file: Path | None = None) -> np.ndarray:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if _has_hf_tokenizer(model_dir) or tok_file is None:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    else:  # a dwm run: its tokenizer.json sits in the run directory, not in the checkpoint's model/
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    L = opts.max_length
    windows, owner = [], []
    for d, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        for a in range(0, max(len(ids), 1), L):
            windows.append(ids[a:a + L])
            owner.append(d)
    n_tok = np.array([len(w) for w in windows], dtype=np.int64)
    rows = np.zeros((len(windows), max(int(n_tok.max()), 2)), dtype=np.int64)
    for i, w in enumerate(windows):
        rows[i, :len(w)] = w
    s, c = _row_nll(model, rows, n_tok, opts.batch_size, device)
    tot_s = np.bincount(owner, weights=s, minlength=len(texts))
    tot_c = np.bincount(owner, weights=c, minlength=len(texts))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot_c > 0, tot_s / tot_c, np.nan)


def keys(result: dict[str, Any], opts: PerplexityOptions, seed: int) -> np.ndarray:
    """Sort keys of the band: -nll (lowest first), nll (highest first) or -|nll - median| (middle outwards)."""
    nll = np.nan_to_num(result["scores"], nan=np.inf)
    if opts.band == "lowest":
        return -nll
    if opts.band == "highest":
        return np.where(np.isfinite(nll), nll, -np.inf)
    med = float(np.median(nll[np.isfinite(nll)])) if np.isfinite(nll).any() else 0.0
    return -np.abs(nll - med)


class PerplexityMethod(SelectionMethod):
    """`--method perplexity` (--ref-model, --band)."""

    name = "perplexity"

    def run(self, pool: Pool, target: Path, engine: Any) -> tuple[dict[str, Any], np.ndarray]:
        a = self.args
        opts = PerplexityOptions(a.ref_model or "", a.band, a.batch_size, a.max_length)
        res = score(pool, opts, a.device)
        return res, keys(res, opts, a.seed)
