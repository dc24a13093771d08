"""The selection pool: the documents of a prepared split, their tokens and text, shards for the engines, and what
every method shares (the token budget, Gumbel keys, the manifest, the per-domain share report, `--write-scores`).

A selection unit is a *document of the prepared data*: a maximal run of consecutive rows with the same doc_id and
source. With `--packing doc` that is exactly one input document. With `--packing stream` a row's doc_id is the
document it starts in, so a short document that starts inside another's row rides with that document (it is in
the same rows: training could not take one without the other). The text a method scores is reconstructed from the
rows by the prepared tokenizer (decode of the real tokens, EOS shown as a newline): exactly what `dwm train` would
see, and the manifest maps back to sample ids without any join on the raw inputs.

Memory: the pool keeps a few numbers per document (start row, tokens, domain, score); text and features are made
shard by shard inside the workers, so a method's working set does not grow with the pool.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dwm.data import dataset
from dwm.data.dataset import data_fingerprint, iter_split_batches, read_meta, split_parts
from dwm.data.mixture import write_manifest
from dwm.errors import UserError
from dwm.nn import sampling

MANIFEST_KEY = b"dwm.selection"
SHARD_TOKENS = 1 << 21  # ~2M tokens of text per engine task: small enough for memory, large for overheads


@dataclass(frozen=True)
class Shard:
    """Documents [u_lo, u_hi) of a pool = rows [row_lo, row_hi); what an engine task needs, nothing more."""

    dir: str
    split: str
    index: int
    u_lo: int
    u_hi: int
    row_lo: int
    row_hi: int
    unit_rows: np.ndarray  # [u_hi - u_lo + 1] row offsets of the documents, relative to row_lo
    row_tokens: np.ndarray  # [row_hi - row_lo] real tokens per row


class Pool:
    """The documents of one split of a prepared directory (see the module docstring)."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.dir, self.split = Path(data_dir), split
        self.meta = read_meta(self.dir)
        if split not in self.meta["splits"]:
            raise UserError(f"{self.dir}: no split {split!r} (has {sorted(self.meta['splits'])})")
        first = split_parts(self.dir, split)[0][0]  # a pool: its shards' parquet files, one after the other
        path = first / f"{split}.parquet"
        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except Exception as e:
            raise UserError(f"cannot read {path}: {e}") from e
        for c in ("doc_id", "domain", "n_tokens"):
            if c not in names:
                raise UserError(f"{path}: missing column {c!r}")
        self.score_columns = [c for c in names if c not in ("sample_id", "doc_id", "source", "domain", "n_tokens")]
        self.domains: list[str] = list(self.meta["domains"])
        index = {d: i for i, d in enumerate(self.domains)}
        # streamed by record batch: what is kept is 4 bytes a row and a few numbers and the doc_id a document
        cols = [c for c in ("doc_id", "source", "domain", "n_tokens") if c in names]
        row_tokens, starts, doc_ids, doms = [], [], [], []
        n, last = 0, None
        try:
            for batch in iter_split_batches(self.dir, split, cols):
                doc = batch.column("doc_id")
                key = pc.binary_join_element_wise(doc, batch.column("source"), "\x00") if "source" in cols else doc
                change = np.ones(len(key), dtype=bool)
                if len(key) > 1:
                    change[1:] = pc.not_equal(key[1:], key[:-1]).to_numpy(zero_copy_only=False)
                if last is not None and len(key):
                    change[0] = key[0].as_py() != last
                first = np.flatnonzero(change)
                starts.append(first + n)
                doc_ids.append(doc.take(pa.array(first)))
                doms += batch.column("domain").take(pa.array(first)).to_pylist()
                row_tokens.append(batch.column("n_tokens").to_numpy().astype(np.int32))
                n += len(key)
                last = key[-1].as_py() if len(key) else last
        except Exception as e:
            raise UserError(f"cannot read {path}: {e}") from e
        if n == 0:
            raise UserError(f"{self.dir}: split {split!r} has no samples")
        self.n_rows = n
        self.row_tokens = np.concatenate(row_tokens)
        start = np.concatenate(starts)
        self.unit_rows = np.append(start, n).astype(np.int64)  # [D + 1]
        self.unit_tokens = np.add.reduceat(self.row_tokens.astype(np.int64), start)
        self.doc_ids: pa.Array = pa.concat_arrays(doc_ids)
        try:
            self.unit_domain = np.array([index[d] for d in doms], dtype=np.int32)
        except KeyError as e:
            raise UserError(f"{path}: domain {e.args[0]!r} not listed in meta.json domains") from e
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.unit_tokens)

    @property
    def total_tokens(self) -> int:
        return int(self.unit_tokens.sum())

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.dir, self.split)
        return self._fingerprint

    def shards(self, min_shards: int = 1, shard_tokens: int = SHARD_TOKENS) -> list[Shard]:
        """Contiguous ranges of documents of about `shard_tokens` tokens (at least min_shards of them when the pool
        has that many documents). A pure function of the pool: both engines get the same shards."""
        D = len(self)
        k = max(min_shards, -(-self.total_tokens // shard_tokens))
        k = max(1, min(k, D))
        cum = np.cumsum(self.unit_tokens)
        cuts = np.searchsorted(cum, cum[-1] * np.arange(1, k) / k, side="left") + 1
        bounds = np.unique(np.concatenate([[0], np.clip(cuts, 1, D), [D]]))
        return [self.shard(i, int(lo), int(hi)) for i, (lo, hi) in enumerate(itertools.pairwise(bounds))]

    def shard(self, index: int, u_lo: int, u_hi: int) -> Shard:
        r_lo, r_hi = int(self.unit_rows[u_lo]), int(self.unit_rows[u_hi])
        return Shard(str(self.dir), self.split, index, u_lo, u_hi, r_lo, r_hi,
                     self.unit_rows[u_lo:u_hi + 1] - r_lo, self.row_tokens[r_lo:r_hi])

    def sample_units(self, n: int, seed: int) -> np.ndarray:
        """n distinct document indices drawn uniformly (sorted), e.g. for a classifier's negatives."""
        n = min(n, len(self))
        return np.sort(np.random.default_rng([seed, 0xC1A5]).choice(len(self), size=n, replace=False))

    def texts(self, units: np.ndarray) -> list[str]:
        """Decoded texts of a few listed documents (random access, e.g. a classifier's negatives)."""
        docs = []
        for u in units:
            lo, hi = int(self.unit_rows[u]), int(self.unit_rows[u + 1])
            docs.append(_real_tokens(read_rows(str(self.dir), self.split, lo, hi), self.row_tokens[lo:hi]))
        return decode(str(self.dir), docs)


# ------------------------------------------------------------------------------------------ shard contents
_TOKENIZERS: dict[str, Any] = {}


def cached_tokenizer(data_dir: str):
    tok = _TOKENIZERS.get(data_dir)
    if tok is None:
        from tokenizers import Tokenizer

        path = Path(data_dir) / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{data_dir}: missing tokenizer.json")
        tok = _TOKENIZERS[data_dir] = Tokenizer.from_file(str(path))
    return tok


def read_rows(data_dir: str, split: str, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a split (a pool's shards joined), read into a fresh array. Not a memmap: pages of a mapped
    file count in the process's RSS while mapped, so a worker that maps its way through the pool would look like it
    held it."""
    return dataset.read_rows(data_dir, split, lo, hi)


def shard_rows(shard: Shard) -> np.ndarray:
    """The shard's rows [row_hi - row_lo, seq_len]."""
    return read_rows(shard.dir, shard.split, shard.row_lo, shard.row_hi)


def _real_tokens(rows: np.ndarray, row_tokens: np.ndarray) -> np.ndarray:
    return rows[np.arange(rows.shape[1])[None, :] < row_tokens[:, None]]


def shard_tokens(shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets): the real tokens of every document of the shard, concatenated, and the [n_docs + 1]
    offsets of each document in them."""
    flat = _real_tokens(shard_rows(shard), shard.row_tokens)
    row_off = np.concatenate([[0], np.cumsum(shard.row_tokens)])
    return flat, row_off[shard.unit_rows]


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_TABLES: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray] | None] = {}


def _byte_table(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(bytes, offsets, lengths) of every token of a byte-level BPE (EOS -> newline, other special tokens -> no
    bytes), or None when the tokenizer is not byte-level (then the tokenizer's own decode_batch is used)."""
    if data_dir in _BYTE_TABLES:
        return _BYTE_TABLES[data_dir]
    tok = cached_tokenizer(data_dir)
    spec = json.loads(tok.to_str())
    table = None
    if (spec.get("decoder") or {}).get("type") == "ByteLevel" and (spec.get("model") or {}).get("type") == "BPE":
        meta = read_meta(data_dir)
        inv = _bytes_to_unicode()
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        chunks = []
        for i in range(tok.get_vocab_size()):
            piece = tok.id_to_token(i) or ""
            if i == int(meta["eos_id"]):
                chunks.append(b"\n")
            elif i in special:
                chunks.append(b"")
            elif all(c in inv for c in piece):
                chunks.append(bytes(inv[c] for c in piece))
            else:  # a non-special added token: its text as is
                chunks.append(piece.encode("utf-8"))
        lens = np.array([len(c) for c in chunks], dtype=np.int64)
        table = (np.frombuffer(b"".join(chunks), dtype=np.uint8), np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    _BYTE_TABLES[data_dir] = table
    return table


def _decode_bytes(table: tuple[np.ndarray, np.ndarray, np.ndarray], docs: list[np.ndarray]) -> list[str]:
    data, off, lens = table
    flat = np.concatenate(docs).astype(np.int64)
    n = lens[flat]
    out_start = np.cumsum(n) - n
    pos = np.repeat(off[flat] - out_start, n) + np.arange(int(n.sum()))
    buf = data[pos].tobytes()
    byte_end = np.concatenate([[0], np.cumsum(n)])[np.cumsum([len(d) for d in docs])]
    starts = np.concatenate([[0], byte_end[:-1]])
    return [buf[a:b].decode("utf-8", "replace") for a, b in zip(starts.tolist(), byte_end.tolist())]


def decode(data_dir: str, docs: list[np.ndarray]) -> list[str]:
    """Texts of token arrays with the prepared tokenizer (EOS as a newline, special tokens dropped). A byte-level
    BPE (what `dwm prepare` trains) is decoded by a vectorised table lookup, as its ByteLevel decoder does (the
    bytes of each token, concatenated, UTF-8 with replacement); any other tokenizer by its decode_batch."""
    table = _byte_table(data_dir)
    if table is not None:
        out: list[str] = []
        i = 0
        while i < len(docs):  # groups of ~256k tokens bound the gather's temporaries (~16 bytes per byte)
            j, size = i, 0
            while j < len(docs) and (j == i or size < 1 << 18):
                size += len(docs[j])
                j += 1
            out += _decode_bytes(table, docs[i:j])
            i = j
        return out
    meta = read_meta(data_dir)
    tok = cached_tokenizer(data_dir)
    nl = tok.encode("\n", add_special_tokens=False).ids
    eos = int(meta["eos_id"])
    out = []
    for d in docs:
        d = d.astype(np.int64)
        if len(nl) == 1:
            d[d == eos] = nl[0]
        out.append(d.tolist())
    return tok.decode_batch(out, skip_special_tokens=True)


def shard_texts(shard: Shard) -> list[str]:
    """The decoded text of every document of the shard."""
    flat, off = shard_tokens(shard)
    return decode(shard.dir, [flat[a:b] for a, b in itertools.pairwise(off)])


# ------------------------------------------------------------------------------------------ choosing
def gumbel_keys(scores: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    """scores / temperature + Gumbel(0, 1) noise from the seed (dwm.nn.sampling.gumbel_keys): sorting by these keys
    draws without replacement with probability proportional to exp(score / temperature). temperature 0: the
    scores."""
    return sampling.gumbel_keys(scores, temperature, np.random.default_rng([seed, 0x6B]))


def fill_budget(keys: np.ndarray, unit_tokens: np.ndarray, budget: int, eligible: np.ndarray | None = None,
                what: str = "pool") -> np.ndarray:
    """Document indices in decreasing key order (ties: lower index first) until their tokens reach `budget`."""
    if budget <= 0:
        raise UserError(f"--budget-tokens must be > 0, got {budget}")
    idx = np.arange(len(keys)) if eligible is None else np.flatnonzero(eligible)
    avail = int(unit_tokens[idx].sum())
    if budget > avail:
        raise UserError(f"--budget-tokens {budget:,} is larger than the {what} ({avail:,} tokens"
                        f"{'' if eligible is None else ' in eligible documents'})")
    order = idx[np.argsort(-keys[idx], kind="stable")]
    cum = np.cumsum(unit_tokens[order])
    k = int(np.searchsorted(cum, budget, side="left")) + 1
    return order[:k]


# ------------------------------------------------------------------------------------------ outputs
def manifest_rows(pool: Pool, chosen: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids, document index per sample) of the chosen documents, in a seeded random order: `dwm train`
    keeps a manifest's order and does not reshuffle it, so the manifest is already shuffled (by sample)."""
    lo, hi = pool.unit_rows[chosen], pool.unit_rows[chosen + 1]
    lens = hi - lo
    doc = np.repeat(chosen, lens)
    ids = np.repeat(lo - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(int(lens.sum()))
    perm = np.random.default_rng([seed, 0x5E1]).permutation(len(ids))
    return ids[perm].astype(np.int64), doc[perm]


def shares(pool: Pool, chosen: np.ndarray) -> dict[str, dict[str, float]]:
    """Per domain: tokens of the pool and of the selection, and their shares."""
    pool_tok = np.bincount(pool.unit_domain, weights=pool.unit_tokens, minlength=len(pool.domains))
    sel_tok = np.bincount(pool.unit_domain[chosen], weights=pool.unit_tokens[chosen], minlength=len(pool.domains))
    tp, ts = pool_tok.sum(), max(sel_tok.sum(), 1)
    return {d: {"pool_tokens": int(pool_tok[i]), "selected_tokens": int(sel_tok[i]),
                "pool_share": float(pool_tok[i] / tp), "selected_share": float(sel_tok[i] / ts)}
            for i, d in enumerate(pool.domains)}


def share_table(sh: dict[str, dict[str, float]]) -> str:
    lines = [f"{'domain':<14} {'pool':>8} {'selected':>9} {'ratio':>7}"]
    for d, s in sh.items():
        ratio = s["selected_share"] / s["pool_share"] if s["pool_share"] else float("nan")
        lines.append(f"{d:<14} {s['pool_share']:>8.1%} {s['selected_share']:>9.1%} {ratio:>7.2f}")
    return "\n".join(lines)


def write_selection(pool: Pool, chosen: np.ndarray, scores: np.ndarray, out: str | Path, info: dict[str, Any],
                    seed: int) -> dict[str, Any]:
    """The manifest (sample_id, doc_id, score; metadata in the parquet schema under b"dwm.selection") and the report
    JSON beside it (out with suffix .json); returns the report."""
    out = Path(out)
    ids, doc = manifest_rows(pool, chosen, seed)
    sh = shares(pool, chosen)
    report = {"format": "dwm-selection/1", **info, "data_dir": str(pool.dir.resolve()), "split": pool.split,
              "fingerprint": pool.fingerprint, "seed": seed, "pool_documents": len(pool),
              "pool_tokens": pool.total_tokens, "selected_documents": len(chosen),
              "selected_samples": len(ids), "selected_tokens": int(pool.unit_tokens[chosen].sum())}
    write_manifest(ids, out, columns={"doc_id": pool.doc_ids.take(pa.array(doc)),
                                      "score": pa.array(np.asarray(scores, np.float64)[doc], pa.float64())},
                   metadata={MANIFEST_KEY: json.dumps(report, sort_keys=True).encode()})
    report["shares"] = sh
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_scores(pool: Pool, scores: np.ndarray, path: str | Path, method: str) -> None:
    """Every pool document's score (doc_id, score, domain, n_tokens) as parquet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"doc_id": pool.doc_ids, "score": pa.array(np.asarray(scores, np.float64)),
                      "domain": pa.array([pool.domains[i] for i in pool.unit_domain], pa.string()),
                      "n_tokens": pa.array(pool.unit_tokens, pa.int64())})
    pq.write_table(table.replace_schema_metadata({b"dwm.scores": json.dumps({"method": method}).encode()}), path)


def read_selection_info(path: str | Path) -> dict[str, Any] | None:
    """The metadata `dwm select` wrote into a manifest, or None (e.g. a hand-made manifest)."""
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[MANIFEST_KEY]) if MANIFEST_KEY in md else None


def log(msg: str) -> None:
    print(f"dwm select: {msg}", file=sys.stderr)
