"""PreparedData: read one split of a `dwm prepare` directory (see docs/ARCHITECTURE.md, "Prepared data").

Tokens stay on disk in a read-only memmap; only the rows of a batch are copied into tensors, so a split larger than
memory trains fine and every DDP rank maps the same file.
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
    if meta.get("format") != FORMAT:
        raise UserError(f"{mpath}: format {meta.get('format')!r}, expected {FORMAT!r}")
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
    h.update(json.dumps({"meta": meta.get("fingerprint") or meta, "split": split}, sort_keys=True).encode())
    bin_path, pq_path = d / f"{split}.bin", d / f"{split}.parquet"
    h.update(str(bin_path.stat().st_size if bin_path.is_file() else -1).encode())
    if pq_path.is_file():
        with open(pq_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


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
        bin_path, pq_path = self.dir / f"{split}.bin", self.dir / f"{split}.parquet"
        for p in (bin_path, pq_path):
            if not p.is_file():
                raise UserError(f"{self.dir}: missing {p.name}")
        dtype = _DTYPES[self.meta["dtype"]]
        expected = n * self.seq_len * np.dtype(dtype).itemsize
        if bin_path.stat().st_size != expected:
            raise UserError(f"{bin_path}: {bin_path.stat().st_size} bytes, expected {expected} "
                            f"({n} samples x {self.seq_len} x {self.meta['dtype']})")
        self.tokens = (np.memmap(bin_path, dtype=dtype, mode="r", shape=(n, self.seq_len)) if n
                       else np.zeros((0, self.seq_len), dtype=dtype))
        try:
            self.table: pa.Table = pq.read_table(pq_path)
        except Exception as e:
            raise UserError(f"cannot read {pq_path}: {e}") from e
        if self.table.num_rows != n:
            raise UserError(f"{pq_path}: {self.table.num_rows} rows but meta.json says {n} samples")
        for col in ("sample_id", "doc_id", "domain", "n_tokens"):
            if col not in self.table.column_names:
                raise UserError(f"{pq_path}: missing column {col!r}")
        self.n_tokens = self.table.column("n_tokens").to_numpy().astype(np.int64)
        self.doc_ids = self.table.column("doc_id").to_pylist()
        index = {d: i for i, d in enumerate(self.domains)}
        try:
            self.domain_ids = np.array([index[d] for d in self.table.column("domain").to_pylist()], dtype=np.int64)
        except KeyError as e:
            raise UserError(f"{pq_path}: domain {e.args[0]!r} not listed in meta.json domains") from e

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
