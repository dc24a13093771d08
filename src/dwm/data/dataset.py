"""PreparedData: read one split of a `dwm prepare` directory or of a pool of them (see docs/ARCHITECTURE.md,
"Prepared data directory").

Tokens stay on disk in read-only memmaps; only the rows of a batch are copied into tensors, so a split larger than
memory trains fine and every DDP rank maps the same files. A pool (`dwm prepare --pool`) is a directory whose
meta.json lists prepared shard directories: its split is their splits one after the other (row i of the pool is
row i - offset of the shard it falls in), the domains are the union of the shards' (ids into the pool's sorted
list), and everything else (seq_len, dtype, pad/eos ids, tokenizer, score columns) is the shards' common value.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dwm.errors import UserError

if TYPE_CHECKING:  # torch is imported by batch() only: `dwm select` reads prepared data without it
    from dwm.data.batch import Batch

FORMAT = "dwm-prepared/1"
POOL_FORMAT = "dwm-pool/1"
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared directory, checked for the fields every reader relies on."""
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"prepared data directory {d} does not exist")
    mpath = d / "meta.json"
    if not mpath.is_file():
        raise UserError(f"{d} is not a prepared data directory (no meta.json; run `dwm prepare`)")
    try:
        meta = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {mpath}: {e}") from e
    if meta.get("format") not in (FORMAT, POOL_FORMAT):
        raise UserError(f"{mpath}: format {meta.get('format')!r}, expected {FORMAT!r} (or a pool, {POOL_FORMAT!r})")
    for key in ("seq_len", "vocab_size", "dtype", "pad_id", "eos_id", "domains", "splits"):
        if key not in meta:
            raise UserError(f"{mpath}: missing field {key!r}")
    if meta["dtype"] not in _DTYPES:
        raise UserError(f"{mpath}: dtype {meta['dtype']!r} not one of {sorted(_DTYPES)}")
    return meta


def data_fingerprint(data_dir: str | Path, split: str = "train") -> str:
    """What identifies one split of a prepared directory: meta.json (its `fingerprint` of inputs and options, or
    the whole file), the split's name, the size of its .bin and the bytes of its .parquet (a few MB). A selection
    manifest records it; `dwm train` refuses a manifest made from another directory."""
    import hashlib

    d = Path(data_dir)
    meta = read_meta(d)
    h = hashlib.sha256()
    if meta["format"] == POOL_FORMAT:  # a pool: its shards' fingerprints, in order (and the domain list they map to)
        shards = [data_fingerprint(sd, split) for sd, _ in pool_shards(d, meta)]
        h.update(json.dumps({"pool": shards, "domains": meta["domains"], "split": split}).encode())
        return h.hexdigest()[:32]
    h.update(json.dumps({"meta": meta.get("fingerprint") or meta, "split": split}, sort_keys=True).encode())
    bin_path, pq_path = d / f"{split}.bin", d / f"{split}.parquet"
    h.update(str(bin_path.stat().st_size if bin_path.is_file() else -1).encode())
    if pq_path.is_file():
        with open(pq_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


# --- pools ------------------------------------------------------------------------------------------------------
# what every shard of a pool must share (a row means the same thing in all of them)
POOL_SHARED = ("seq_len", "vocab_size", "dtype", "pad_id", "eos_id")


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_shards_agree(shards: list[tuple[Path, dict]], what: str) -> None:
    """One line for the first shard whose seq_len / vocab / dtype / pad / eos / score columns differ from the first
    shard's (`what` names the pool in the message)."""
    d0, m0 = shards[0]
    for d, m in shards[1:]:
        for key in (*POOL_SHARED, "score_columns"):
            if m.get(key, []) != m0.get(key, []):
                raise UserError(f"{what}: shard {d} has {key} {m.get(key)!r} but {d0} has {m0.get(key)!r} (the shards "
                                "of a pool must be prepared with the same tokenizer and options)")


def pool_shards(data_dir: str | Path, meta: dict | None = None) -> list[tuple[Path, dict]]:
    """(dir, meta) of every prepared directory making up `data_dir`, in pool order: the pool's shards, checked
    unchanged since the pool was made, or [(data_dir, meta)] for a plain prepared directory."""
    d = Path(data_dir)
    meta = meta or read_meta(d)
    if meta["format"] != POOL_FORMAT:
        return [(d, meta)]
    entries = meta.get("shards") or []
    if not entries:
        raise UserError(f"{d / 'meta.json'}: a pool that lists no shards")
    out = []
    for e in entries:
        sd = Path(e["dir"]) if Path(e["dir"]).is_absolute() else d / e["dir"]
        try:
            sm = read_meta(sd)
        except UserError as err:
            raise UserError(f"{d}: pool shard {e['dir']}: {err}") from None
        if sm["format"] != FORMAT:
            raise UserError(f"{d}: pool shard {sd} is itself a pool (list its shards instead)")
        if file_sha256(sd / "meta.json") != e.get("meta_sha256"):
            raise UserError(f"{d}: shard {sd} was prepared again since the pool was made (run `dwm prepare --pool` "
                            "again)")
        out.append((sd, sm))
    check_shards_agree(out, str(d))
    return out


def split_parts(data_dir: str | Path, split: str) -> list[tuple[Path, int]]:
    """(directory, rows) of each piece of a split, in order: one piece for a prepared directory, one per shard for
    a pool."""
    parts = []
    for sd, sm in pool_shards(data_dir):
        if split not in sm["splits"]:
            raise UserError(f"{sd}: no split {split!r} (has {sorted(sm['splits'])})")
        parts.append((sd, int(sm["splits"][split]["n_samples"])))
    return parts


def _renumber(table: pa.Table, start: int) -> pa.Table:
    if "sample_id" not in table.column_names:
        return table
    i = table.column_names.index("sample_id")
    ids = pa.array(np.arange(start, start + table.num_rows, dtype=np.int64))
    return table.set_column(i, "sample_id", ids)


def read_split_table(data_dir: str | Path, split: str, columns: list[str] | None = None) -> pa.Table:
    """A split's parquet metadata as one table (a pool's shards concatenated, sample_id counting on)."""
    tables, start = [], 0
    for sd, _ in split_parts(data_dir, split):
        path = sd / f"{split}.parquet"
        try:
            t = pq.read_table(path, columns=columns)
        except Exception as e:
            raise UserError(f"cannot read {path}: {e}") from e
        tables.append(_renumber(t, start) if start else t)
        start += t.num_rows
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def iter_split_batches(data_dir: str | Path, split: str, columns: list[str], batch_size: int = 1 << 16):
    """A split's parquet metadata as record batches, streamed (a pool's shards one after the other)."""
    start = 0
    for sd, _ in split_parts(data_dir, split):
        path = sd / f"{split}.parquet"
        try:
            pf = pq.ParquetFile(path)
            for b in pf.iter_batches(batch_size=batch_size, columns=columns, use_threads=False):
                if "sample_id" in b.schema.names and start:
                    b = pa.RecordBatch.from_arrays(
                        [pa.array(np.arange(start, start + b.num_rows, dtype=np.int64)) if n == "sample_id" else c
                         for n, c in zip(b.schema.names, b.columns)], names=b.schema.names)
                yield b
            start += pf.metadata.num_rows
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read {path}: {e}") from e


_LAYOUTS: dict[tuple[str, str], tuple[list[tuple[Path, int]], np.ndarray, np.dtype, int]] = {}


def read_rows(data_dir: str | Path, split: str, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a split's token rows (a pool's shards joined), read into a fresh array. Not a memmap: pages
    of a mapped file count in the process's RSS while mapped, so a worker that maps its way through the data would
    look like it held it."""
    key = (str(data_dir), split)
    if key not in _LAYOUTS:
        meta = read_meta(data_dir)
        parts = split_parts(data_dir, split)
        _LAYOUTS[key] = (parts, np.cumsum([0] + [n for _, n in parts]), np.dtype(_DTYPES[meta["dtype"]]),
                         int(meta["seq_len"]))
    parts, off, dtype, L = _LAYOUTS[key]
    out = np.empty((hi - lo, L), dtype=dtype)
    for k, (sd, _) in enumerate(parts):
        a, b = max(lo, int(off[k])), min(hi, int(off[k + 1]))
        if a < b:
            rows = np.fromfile(sd / f"{split}.bin", dtype=dtype, count=(b - a) * L,
                               offset=(a - int(off[k])) * L * dtype.itemsize)
            out[a - lo:b - lo] = rows.reshape(b - a, L)
    return out


def _domain_ids(col: pa.ChunkedArray, value_set: pa.Array, path: Path) -> np.ndarray:
    """int64 index of each row's domain in value_set; a dictionary column is mapped through its dictionary."""
    import pyarrow.compute as pc

    out = []
    for chunk in col.chunks:
        if pa.types.is_dictionary(chunk.type):
            ids = pc.index_in(chunk.dictionary, value_set=value_set).take(chunk.indices)
        else:
            ids = pc.index_in(chunk, value_set=value_set)
        if ids.null_count:
            bad = chunk.filter(pc.is_null(ids))[0].as_py()
            raise UserError(f"{path}: domain {bad!r} not listed in meta.json domains")
        out.append(ids.to_numpy(zero_copy_only=False).astype(np.int64))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class ConcatRows:
    """Row-concatenation of memmaps [n_k, L] that indexes like one [sum n_k, L] array (an int, a slice, an index
    array or mask, optionally with a column index: `rows[ids]`, `rows[i, :n]`); only the rows asked for are read."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
        self.dtype = parts[0].dtype
        self.shape = (int(self.offsets[-1]), int(parts[0].shape[1]))
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def _row(self, i: int) -> np.ndarray:
        n = self.shape[0]
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k][i - self.offsets[k]]

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        n = self.shape[0]
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        flat = idx.reshape(-1) % max(n, 1)
        out = np.empty((len(flat), self.shape[1]), dtype=self.dtype)
        which = np.searchsorted(self.offsets, flat, side="right") - 1
        for k in np.unique(which):
            m = which == k
            out[m] = self.parts[k][flat[m] - self.offsets[k]]
        return out.reshape(*idx.shape, self.shape[1])

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            out = self._row(int(key))
        elif isinstance(key, slice):
            out = self._rows(np.arange(self.shape[0])[key])
        else:
            out = self._rows(np.asarray(key))
        if not rest:
            return out
        return out[rest] if isinstance(key, (int, np.integer)) else out[(slice(None), *rest)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class PreparedData:
    """One split: `.tokens` [N, seq_len] memmap, `.n_tokens`, `.domain_ids`, `.doc_ids`, `.table`, `.batch(idx)`."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.dir = Path(data_dir)
        self.split = split
        self.meta = read_meta(self.dir)
        if split not in self.meta["splits"]:
            raise UserError(f"{self.dir}: no split {split!r} (has {sorted(self.meta['splits'])})")
        self.seq_len: int = int(self.meta["seq_len"])
        self.vocab_size: int = int(self.meta["vocab_size"])
        self.pad_id: int = int(self.meta["pad_id"])
        self.eos_id: int = int(self.meta["eos_id"])
        # BOS policy (dwm.data.tokenizer): absent in directories written before it, which read as "no BOS"
        bos = self.meta.get("bos_id")
        self.bos_id: int | None = None if bos is None else int(bos)
        self.add_bos: bool = bool(self.meta.get("add_bos", False))
        self.domains: list[str] = list(self.meta["domains"])
        self.score_columns: list[str] = list(self.meta.get("score_columns", []))
        n = int(self.meta["splits"][split]["n_samples"])
        self.parts = split_parts(self.dir, split)  # [(dir, rows)]: the directory itself, or a pool's shards
        if sum(k for _, k in self.parts) != n:
            raise UserError(f"{self.dir}/meta.json: {n} {split} samples, but its shards hold "
                            f"{sum(k for _, k in self.parts)}")
        dtype = _DTYPES[self.meta["dtype"]]
        maps = []
        for sd, k in self.parts:
            bin_path, pq_path = sd / f"{split}.bin", sd / f"{split}.parquet"
            for p in (bin_path, pq_path):
                if not p.is_file():
                    raise UserError(f"{sd}: missing {p.name}")
            expected = k * self.seq_len * np.dtype(dtype).itemsize
            if bin_path.stat().st_size != expected:
                raise UserError(f"{bin_path}: {bin_path.stat().st_size} bytes, expected {expected} "
                                f"({k} samples x {self.seq_len} x {self.meta['dtype']})")
            maps.append(np.memmap(bin_path, dtype=dtype, mode="r", shape=(k, self.seq_len)) if k
                        else np.zeros((0, self.seq_len), dtype=dtype))
        self.tokens: np.ndarray | ConcatRows = maps[0] if len(maps) == 1 else ConcatRows(maps)
        # what every batch needs, 16 bytes a row: n_tokens and domain ids into self.domains (a pool's sorted union),
        # read as two columns (the domain dictionary-encoded); the rest of the metadata (`.table`) on first use
        value_set = pa.array(self.domains, pa.string())
        n_tok, dom_ids = [], []
        for sd, k in self.parts:
            pq_path = sd / f"{split}.parquet"
            try:
                pf = pq.ParquetFile(pq_path, read_dictionary=["domain"])
                names = pf.schema_arrow.names
                for col in ("sample_id", "doc_id", "domain", "n_tokens"):
                    if col not in names:
                        raise UserError(f"{pq_path}: missing column {col!r}")
                t = pf.read(columns=["n_tokens", "domain"], use_threads=False)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"cannot read {pq_path}: {e}") from e
            if t.num_rows != k:
                raise UserError(f"{pq_path}: {t.num_rows} rows but meta.json says {k} samples")
            n_tok.append(t.column("n_tokens").to_numpy().astype(np.int64))
            dom_ids.append(_domain_ids(t.column("domain"), value_set, pq_path))
        self.n_tokens = np.concatenate(n_tok)
        self.domain_ids = np.concatenate(dom_ids)
        self._table: pa.Table | None = None
        self._doc_ids: list[str] | None = None

    @property
    def table(self) -> pa.Table:
        """All the parquet metadata (a pool's shards concatenated, sample_id counting on), read on first use."""
        if self._table is None:
            self._table = read_split_table(self.dir, self.split)
        return self._table

    @property
    def doc_ids(self) -> list[str]:
        """doc_id of every row (made on first use: a Python string per row)."""
        if self._doc_ids is None:
            self._doc_ids = self.table.column("doc_id").to_pylist()
        return self._doc_ids

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    def batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Rows `indices` (sample ids) as a CPU Batch; rows are copied out of the memmap in the given order."""
        import torch

        from dwm.data.batch import Batch

        idx = np.asarray(indices, dtype=np.int64)
        rows = np.asarray(self.tokens[idx], dtype=np.int64) if len(idx) else np.zeros((0, self.seq_len), np.int64)
        return Batch(
            input_ids=torch.from_numpy(rows),
            n_tokens=torch.from_numpy(self.n_tokens[idx].copy()),
            sample_ids=torch.from_numpy(idx.copy()),
            domain_ids=torch.from_numpy(self.domain_ids[idx].copy()),
        )
