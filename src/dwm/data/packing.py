"""Packing: one split's token stream cut into fixed-length rows. SplitWriter appends each document (after its BOS,
followed by EOS) to DIR/{split}.bin as rows of seq_len tokens (`stream`: a source's documents concatenated;
`doc`: each document cut separately, its last row padded) and the rows' metadata (sample_id, doc_id, domain,
source, n_tokens, score columns) to DIR/{split}.parquet in row groups of ROW_GROUP rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dwm.data.readers import Document

ROW_GROUP = 65536


class SplitWriter:
    """Cuts one split's token stream into rows, appends them to {split}.bin and their metadata to parquet."""

    def __init__(self, d: Path, name: str, seq_len: int, dtype: np.dtype, eos_id: int, pad_id: int,
                 packing: str, score_columns: tuple[str, ...], bos_id: int | None = None):
        self.seq_len, self.dtype, self.eos_id, self.pad_id, self.packing = seq_len, dtype, eos_id, pad_id, packing
        self.bos_id = bos_id  # prepended to every document when the tokenizer's BOS policy says so
        self.score_columns = score_columns
        self.bin = open(d / f"{name}.bin", "wb")  # noqa: SIM115 - closed in close()
        fields = [("sample_id", pa.int64()), ("doc_id", pa.string()), ("domain", pa.string()),
                  ("source", pa.string()), ("n_tokens", pa.int32())]
        self.schema = pa.schema(fields + [(c, pa.float64()) for c in score_columns])
        self.pq = pq.ParquetWriter(d / f"{name}.parquet", self.schema, compression="zstd")
        self.n_samples = self.n_docs = self.n_real_tokens = 0
        self._meta: list[tuple] = []  # per pending row: (doc_id, domain, source, n_tokens, scores)
        # stream packing state: pending token arrays and, per pending document, its start and metadata
        self._buf: list[np.ndarray] = []
        self._buf_len = 0
        self._starts: list[int] = []
        self._docs: list[tuple] = []

    def add(self, doc: Document, ids: list[int]) -> None:
        lead = 0 if self.bos_id is None else 1
        arr = np.empty(lead + len(ids) + 1, dtype=self.dtype)
        if lead:
            arr[0] = self.bos_id
        arr[lead:-1] = ids
        arr[-1] = self.eos_id
        self.n_docs += 1
        info = (doc.doc_id, doc.domain, doc.source, doc.scores)
        if self.packing == "doc":
            self._emit_stream(arr, [0], [info], final=True)
            return
        self._buf.append(arr)
        self._starts.append(self._buf_len)
        self._docs.append(info)
        self._buf_len += len(arr)
        if self._buf_len >= 64 * self.seq_len:
            self._drain(final=False)

    def end_source(self) -> None:
        """A source's stream ends: its last partial row is padded (stream packing never crosses sources)."""
        if self._buf:
            self._drain(final=True)

    def _drain(self, final: bool) -> None:
        stream = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        consumed = self._emit_stream(stream, self._starts, self._docs, final)
        rest = stream[consumed:]
        if len(rest) == 0:
            self._buf, self._buf_len, self._starts, self._docs = [], 0, [], []
            return
        k = int(np.searchsorted(np.asarray(self._starts), consumed, side="right")) - 1
        self._buf, self._buf_len = [rest], len(rest)
        self._starts = [s - consumed for s in self._starts[k:]]
        self._docs = self._docs[k:]

    def _emit_stream(self, stream: np.ndarray, starts: list[int], docs: list[tuple], final: bool) -> int:
        """Write every full row of `stream` (and the padded tail if final); return the tokens consumed."""
        L = self.seq_len
        n_full = len(stream) // L
        n_rows = n_full + (1 if final and len(stream) % L else 0)
        if n_rows == 0:
            return 0
        if n_rows > n_full:
            rows = np.full((n_rows, L), self.pad_id, dtype=self.dtype)
            rows.reshape(-1)[: len(stream)] = stream
        else:
            rows = stream[: n_full * L].reshape(n_full, L)
        self.bin.write(rows.tobytes())
        row_starts = np.arange(n_rows, dtype=np.int64) * L
        which = np.searchsorted(np.asarray(starts), row_starts, side="right") - 1
        consumed = min(len(stream), n_rows * L)
        for r in range(n_rows):
            doc_id, domain, source, scores = docs[int(which[r])]
            n_tok = min(L, len(stream) - r * L)
            self._meta.append((doc_id, domain, source, n_tok, scores))
        self.n_real_tokens += consumed
        if len(self._meta) >= ROW_GROUP:
            self._flush_meta()
        return consumed

    def _flush_meta(self) -> None:
        if not self._meta:
            return
        m = self._meta
        cols = {
            "sample_id": pa.array(np.arange(self.n_samples, self.n_samples + len(m), dtype=np.int64)),
            "doc_id": pa.array([r[0] for r in m], pa.string()),
            "domain": pa.array([r[1] for r in m], pa.string()),
            "source": pa.array([r[2] for r in m], pa.string()),
            "n_tokens": pa.array([r[3] for r in m], pa.int32()),
        }
        for j, c in enumerate(self.score_columns):
            cols[c] = pa.array([r[4][j] for r in m], pa.float64())
        self.pq.write_table(pa.table(cols, schema=self.schema), row_group_size=ROW_GROUP)
        self.n_samples += len(m)
        self._meta = []

    def close(self) -> None:
        self.end_source()
        self._flush_meta()
        self.pq.close()
        self.bin.close()
