"""DSIR: data selection with importance resampling (Xie et al., 2023), with the features of the authors' package
(`data-selection`, `HashedNgramDSIR`), so that log importance weights are comparable:

- a document's words are nltk's WordPunctTokenizer of its lowercased text: maximal runs of `\\w` characters or of
  characters that are neither `\\w` nor whitespace (Python `re` Unicode classes);
- features: every word (unigram) and every pair of adjacent words (bigram, n-grams up to `ngrams`), each hashed into
  one of `buckets` (10,000) counters;
- the target and the raw pool are bags of these hashed n-grams: p = counts / counts.sum() (no smoothing; fit on
  the whole pool, the package's default for pools under 10^9 n-grams);
- log importance weight of a document = sum over its n-gram occurrences of log(p_t + 1e-8) - log(p_r + 1e-8)
  (`score = "sum"`, the package's, kept for parity), or by default that log ratio averaged over the document's
  n-grams (`score = "mean"`, see below);
- documents of fewer than `min_words` words (100) are not selected; the rest are resampled by Gumbel top-k on the
  scores (sampling without replacement proportional to the importance weight), here to a token budget.

Documents of any length (`score = "mean"`, the default). The package scores whatever examples it is given with
the whole sum; the DSIR paper gives it examples of one length (chunks of 128 words), where the sum is fair. A
selection unit here is a whole document (the manifest names documents of the prepared data, not chunks), and
documents differ in length by orders of magnitude. Most n-grams of a document are rarer in a small target than in
the pool, so the sum is mostly negative and ranks documents by shortness rather than by how target-like their text
is (Spearman -0.95 between score and length on the shipped corpus; toward the novels target it selected email,
the shortest documents, first). The mean log ratio per n-gram occurrence does not grow with length; it is
multiplied by the number of n-grams of one 128-word example (`EXAMPLE_WORDS`: 255 with unigrams and bigrams), a
constant, so a document scores as a paper-sized example of its average text would, and Gumbel sampling at
temperature 1 is as sharp as the paper's resampling of chunks. Chunking documents the paper's way would score each
128-word chunk, but a chunk cannot be selected without its document here; the document's mean is its chunks'
scores averaged (up to the bigrams across chunk boundaries). benchmarks/results/select.md (section 5) measures both.

What differs: the hash. The package hashes each n-gram's string with SHA-256 in a Python loop; here every word is
hashed at once with numpy (a polynomial hash of its code points, mixed by splitmix64; an n-gram's hash combines its
words' hashes), so the buckets' collisions differ but not the model (benchmarks/bench_select.py measures the rank
agreement). `features = "tokens"` uses n-grams of the prepared data's token ids instead (no decoding).

Pool passes: one pass hashes every document once; the local engine keeps each shard's bucket ids in a temporary
file (2 bytes per n-gram) for the scoring pass, the Ray engine hashes twice (tasks may run on other machines).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dwm.errors import UserError
from dwm.selection.pool import Pool, Shard, gumbel_keys, log, shard_texts, shard_tokens

U64 = np.uint64
_C1 = U64(0xBF58476D1CE4E5B9)
_C2 = U64(0x94D049BB133111EB)
_GOLD = U64(0x9E3779B97F4A7C15)
_POW_BITS = 16
_CHARS_PER_BATCH = 1 << 19  # ~40 MB of temporaries per batch
EXAMPLE_WORDS = 128  # the DSIR paper's example length (128-word chunks): the scale of score = "mean"


@dataclass
class DSIROptions:
    ngrams: int = 2
    buckets: int = 10000
    features: Literal["words", "tokens"] = "words"
    min_words: int = 100
    temperature: float = 1.0  # 0: deterministic top-k
    score: Literal["mean", "sum"] = "mean"  # mean log ratio per n-gram (x n-grams of a 128-word example) | the sum

    def validate(self) -> None:
        if self.ngrams < 1:
            raise UserError(f"--dsir-ngrams must be >= 1, got {self.ngrams}")
        if not 1 <= self.buckets < 1 << 31:
            raise UserError(f"--dsir-buckets must be in [1, 2^31), got {self.buckets}")
        if self.features not in ("words", "tokens"):
            raise UserError(f"--dsir-features must be words or tokens, not {self.features!r}")
        if self.score not in ("mean", "sum"):
            raise UserError(f"--dsir-score must be mean or sum, not {self.score!r}")

    @property
    def example_ngrams(self) -> int:
        """n-grams (unigrams .. `ngrams`-grams) of one example of EXAMPLE_WORDS words."""
        return sum(max(0, EXAMPLE_WORDS - k) for k in range(self.ngrams))


# ------------------------------------------------------------------------------------------ hashing
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> U64(30))
    x = x * _C1
    x = x ^ (x >> U64(27))
    x = x * _C2
    return x ^ (x >> U64(31))


_POW = _mix(np.arange(1, (1 << _POW_BITS) + 1, dtype=U64)) | U64(1)  # an odd random multiplier per position
_CLASSES: np.ndarray | None = None


def char_classes() -> np.ndarray:
    """[0x110000] uint8: 0 whitespace (`\\s`), 1 word (`\\w`), 2 anything else; Python `re`'s Unicode classes."""
    global _CLASSES
    if _CLASSES is None:
        s = "".join(map(chr, range(0x110000)))
        cls = np.full(0x110000, 2, dtype=np.uint8)
        for pat, c in ((r"\s+", 0), (r"\w+", 1)):
            for m in re.finditer(pat, s):
                cls[m.start():m.end()] = c
        _CLASSES = cls
    return _CLASSES


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hash per word [W] uint64, document index per word [W]) of WordPunctTokenizer(text.lower()) for each text."""
    lows = [t.lower() for t in texts]
    lens = np.fromiter((len(t) + 1 for t in lows), dtype=np.int64, count=len(lows))
    cp = np.frombuffer("\n".join(lows).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    c = char_classes()[cp]
    prev = np.empty_like(c)
    prev[0] = 0
    prev[1:] = c[:-1]
    start = (c != 0) & (c != prev)
    inside = np.flatnonzero(c)  # characters that belong to a word
    first = np.flatnonzero(start[inside])  # index into `inside` of each word's first character
    if len(first) == 0:
        return np.zeros(0, U64), np.zeros(0, np.int64)
    word_of = np.cumsum(start[inside]) - 1
    pos = inside[first]
    rel = inside - pos[word_of]
    v = (cp[inside].astype(U64) + U64(1)) * _POW[rel & ((1 << _POW_BITS) - 1)]
    h = np.add.reduceat(v, first)
    length = np.diff(np.append(first, len(inside))).astype(U64)
    h = _mix(h ^ (length << U64(40)))
    doc_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    doc = np.searchsorted(doc_start, pos, side="right") - 1
    return h, doc


def ngram_buckets(h: np.ndarray, doc: np.ndarray, n: int, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket per n-gram occurrence, document per occurrence) for the unigrams .. n-grams of a word (or token)
    sequence; an n-gram never spans two documents."""
    nb = U64(buckets)
    doc = doc.astype(np.int32)
    out_b, out_d = [(h % nb).astype(np.int32)], [doc]
    g = h
    for k in range(1, n):
        if len(h) <= k:
            break
        g = _mix(g[: len(h) - k] * _GOLD + h[k:])
        same = doc[k:] == doc[: len(h) - k]
        out_b.append((g[same] % nb).astype(np.int32))
        out_d.append(doc[: len(h) - k][same])
    return np.concatenate(out_b), np.concatenate(out_d)


def text_features(texts: list[str], opts: DSIROptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(buckets, doc per bucket occurrence, words per document) of texts, in batches of ~2M characters."""
    bs, ds, words = [], [], np.zeros(len(texts), dtype=np.int64)
    i = 0
    while i < len(texts):
        j, size = i, 0
        while j < len(texts) and (j == i or size < _CHARS_PER_BATCH):
            size += len(texts[j])
            j += 1
        h, doc = word_hashes(texts[i:j])
        words[i:j] = np.bincount(doc, minlength=j - i)
        b, d = ngram_buckets(h, doc, opts.ngrams, opts.buckets)
        bs.append(b)
        ds.append(d + np.int32(i))
        i = j
    if not bs:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), words
    return np.concatenate(bs), np.concatenate(ds), words


def token_features(tokens: np.ndarray, offsets: np.ndarray, opts: DSIROptions
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same from token ids (features = "tokens"): a token is a word."""
    counts = np.diff(offsets)
    doc = np.repeat(np.arange(len(counts)), counts)
    h = _mix(tokens.astype(U64) + _GOLD)
    b, d = ngram_buckets(h, doc, opts.ngrams, opts.buckets)
    return b, d, counts.astype(np.int64)


def shard_features(shard: Shard, opts: DSIROptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if opts.features == "tokens":
        return token_features(*shard_tokens(shard), opts)
    return text_features(shard_texts(shard), opts)


# ------------------------------------------------------------------------------------------ engine tasks
def _spill_path(spill: str | None, shard: Shard) -> Path | None:
    return Path(spill) / f"shard_{shard.index:06d}.npz" if spill else None


def fit_task(item: tuple[Shard, DSIROptions, str | None]) -> np.ndarray:
    """Counts of the shard's n-gram buckets [buckets]; keeps the features in the spill directory if given."""
    shard, opts, spill = item
    b, d, words = shard_features(shard, opts)
    path = _spill_path(spill, shard)
    if path is not None:
        dt = np.uint16 if opts.buckets <= 1 << 16 else np.uint32
        np.savez(path, b=b.astype(dt), d=d.astype(np.int32), words=words)
    return np.bincount(b, minlength=opts.buckets).astype(np.float64)


def score_task(item: tuple[Shard, DSIROptions, str | None, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sum of the n-grams' log ratios, words, n-grams) of every document of the shard."""
    shard, opts, spill, log_diff = item
    path = _spill_path(spill, shard)
    if path is not None and path.is_file():
        z = np.load(path)
        b, d, words = z["b"], z["d"], z["words"]
        path.unlink()
    else:
        b, d, words = shard_features(shard, opts)
    n = shard.u_hi - shard.u_lo
    return np.bincount(d, weights=log_diff[b], minlength=n), words, np.bincount(d, minlength=n)


def doc_scores(sums: np.ndarray, ngrams: np.ndarray, opts: DSIROptions) -> np.ndarray:
    """A document's score from its n-grams' summed log ratios: the sum itself (`sum`), or their mean times the
    n-grams of a 128-word example (`mean`; 0 for a document without n-grams)."""
    if opts.score == "sum":
        return sums
    return sums / np.maximum(ngrams, 1) * opts.example_ngrams


# ------------------------------------------------------------------------------------------ the method
def read_target_texts(path: str | Path) -> list[str]:
    """Texts of a target: a LAMBADA-format JSONL (or any .jsonl[.gz|.zst] / .parquet with a "text" field), a plain
    .txt file, or a directory of them."""
    from dwm.data.readers import ReadOptions, SkipCounter, expand_inputs, iter_documents

    p = Path(path)
    if not p.exists():
        raise UserError(f"target {p} does not exist")
    try:
        sources, _ = expand_inputs([p])
        texts = [d.text for s in sources for d in iter_documents(s, ReadOptions(), SkipCounter())]
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read target {p}: {e}") from e
    if not any(t.strip() for t in texts):
        raise UserError(f"target {p} has no text")
    return texts


def target_counts(texts: list[str], opts: DSIROptions, data_dir: str | Path) -> np.ndarray:
    if opts.features == "tokens":
        from dwm.selection.pool import _tokenizer

        enc = _tokenizer(str(data_dir)).encode_batch(texts, add_special_tokens=False)
        ids = [np.asarray(e.ids, np.int64) for e in enc]
        off = np.concatenate([[0], np.cumsum([len(x) for x in ids])])
        b, _, _ = token_features(np.concatenate(ids) if ids else np.zeros(0, np.int64), off, opts)
    else:
        b, _, _ = text_features(texts, opts)
    if len(b) == 0:
        raise UserError("the target has no words")
    return np.bincount(b, minlength=opts.buckets).astype(np.float64)


def log_diff(target: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """log p_target - log p_raw per bucket, the package's formula (+1e-8 inside both logs)."""
    return np.log(target / target.sum() + 1e-8) - np.log(raw / raw.sum() + 1e-8)


def score(pool: Pool, opts: DSIROptions, target: str | Path, engine: Any) -> dict[str, Any]:
    """Fit both bags of n-grams and score every document: {"scores": log importance weights (`opts.score`),
    "eligible": words >= min_words, "words": ..., "ngrams": n-grams per document, "settings": ...}."""
    opts.validate()
    if opts.features == "words":
        char_classes()  # once, before the workers fork
    t_counts = target_counts(read_target_texts(target), opts, pool.dir)
    shards = pool.shards(min_shards=engine.workers)
    spill = tempfile.mkdtemp(prefix="dwm-dsir-") if engine.shared_disk else None
    try:
        raw = sum(engine.map(fit_task, [(s, opts, spill) for s in shards]))
        ld = log_diff(t_counts, raw)
        parts = engine.map(score_task, [(s, opts, spill, ld) for s in shards])
    finally:
        if spill:
            shutil.rmtree(spill, ignore_errors=True)
    ngrams = np.concatenate([p[2] for p in parts])
    scores = doc_scores(np.concatenate([p[0] for p in parts]), ngrams, opts)
    words = np.concatenate([p[1] for p in parts])
    log(f"dsir: {len(shards)} shards, {int(raw.sum()):,} pool n-grams, {int(t_counts.sum()):,} target n-grams")
    return {"scores": scores, "eligible": words >= opts.min_words, "words": words, "ngrams": ngrams,
            "settings": {**asdict(opts), "target": str(target)}}


def keys(result: dict[str, Any], opts: DSIROptions, seed: int) -> np.ndarray:
    return gumbel_keys(result["scores"], opts.temperature, seed)
