"""Input formats -> one stream of `Document`s, with a single error policy.

Supported inputs (a path argument may be a file or a directory):
  * JSONL: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON object a line)
  * parquet: `.parquet` (read in record batches, never whole)
  * `.txt` files: one document per file; a directory of them is one source
  * Hugging Face `datasets.save_to_disk` directories (their arrow stream files, read with pyarrow)
  * a directory holding any of the above

Every record is either yielded or counted as skipped under a reason (`SkipCounter`), so that the caller can
assert docs_in == docs_written + docs_skipped. With on_error="fail" the first bad record raises a UserError
naming the file and line (or row).
"""

from __future__ import annotations

import gzip
import io
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dwm.config import did_you_mean
from dwm.data.formats import (
    HF_MARKERS,
    JSONL_SUFFIXES,
    InputSource,
    domain_source_from_name,
    expand_inputs,
)
from dwm.errors import UserError

# the names this module always offered; the input formats and their sources are dwm.data.formats
__all__ = ["DOMAIN_PROBE", "HF_MARKERS", "JSONL_SUFFIXES", "REASONS", "Document", "InputSource", "ReadOptions",
           "SkipCounter", "domain_field_error", "domain_source_from_name", "expand_inputs", "field_paths",
           "iter_documents", "lookup"]
# reason -> human description (used in messages and kept stable as stats.json keys)
REASONS: dict[str, str] = {
    "invalid_json": "invalid JSON (or not a JSON object)",
    "missing_text": "text field missing",
    "non_string_text": "text field is not a string",
    "invalid_utf8": "invalid UTF-8",
    "binary": "binary content (NUL bytes)",
    "empty": "empty or whitespace-only document",
    "missing_domain": "domain field (--domain-field) missing, null or empty",
    "non_string_domain": "domain field (--domain-field) is not a string (a number, list or object)",
}
# --domain-field: a source whose first DOMAIN_PROBE records (or all, if fewer) all lack the field is a mistake
# (a misspelt or wrong field), not data to skip: reading stops with the fields it did find.
DOMAIN_PROBE = 1000


@dataclass
class Document:
    """One document, ready for tokenization. `where` is "file:line" for error messages."""

    text: str
    doc_id: str
    domain: str
    source: str
    scores: tuple[float, ...] = ()
    n_bytes: int = 0


@dataclass
class ReadOptions:
    text_field: str = "text"
    id_field: str = "id"
    domain_field: str | None = None
    score_fields: tuple[str, ...] = ()
    on_error: str = "skip"  # "skip" | "fail"


@dataclass
class SkipCounter:
    """Counts documents seen and skipped per reason; keeps the first few examples for the report."""

    docs_in: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    scores_missing: int = 0

    @property
    def docs_skipped(self) -> int:
        return sum(self.skipped.values())


def lookup(rec: dict, path: str) -> object:
    """rec[path], or for a dotted path ("meta.redpajama_set_name") the value inside nested objects (parquet
    struct columns read as nested dicts too); None when any step is missing or not an object. A key that holds a
    dot itself is matched first."""
    if path in rec:
        return rec[path]
    cur: object = rec
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def field_paths(rec: dict, prefix: str = "", depth: int = 4) -> list[str]:
    """The dotted paths of a record's fields, nested objects walked (`meta`, `meta.redpajama_set_name`)."""
    out = []
    for k, v in rec.items():
        name = f"{prefix}{k}"
        out.append(name)
        if isinstance(v, dict) and depth > 1:
            out += field_paths(v, f"{name}.", depth - 1)
    return out


def _schema_paths(fields, prefix: str = "") -> list[str]:
    """Dotted paths of an arrow schema's fields, struct columns walked."""
    import pyarrow as pa

    out = []
    for f in fields:
        out.append(f"{prefix}{f.name}")
        if pa.types.is_struct(f.type):
            out += _schema_paths(list(f.type), f"{prefix}{f.name}.")
    return out


def domain_field_error(field: str, where: str, n: int, found: list[str], first: bool = False) -> UserError:
    """The one line that stops a read whose --domain-field matches nothing: the fields that are there."""
    have = ", ".join(found[:40]) + (", ..." if len(found) > 40 else "") if found else "none"
    which = "the first record" if first and n == 1 else f"the first {n} records" if first else f"all {n} records"
    return UserError(f"{where}: --domain-field {field!r} is missing in {which} (fields found: {have})"
                     f"{did_you_mean(field, found)}")


def _open_binary(p: Path) -> io.BufferedIOBase:
    if p.name.endswith(".gz"):
        return gzip.open(p, "rb")
    if p.name.endswith(".zst"):
        import zstandard

        raw = open(p, "rb")  # noqa: SIM115 - owned by the returned reader
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(p, "rb")


class _Reader:
    """Shared validation: turns raw records into Documents or counted skips."""

    def __init__(self, opts: ReadOptions, counter: SkipCounter):
        self.opts = opts
        self.counter = counter
        # --domain-field in this source: records that had it / lacked it, and the fields seen while none had it
        self.domain_found = self.domain_missing = 0
        self.fields_seen: dict[str, None] = {}

    def skip(self, reason: str, where: str) -> None:
        if self.opts.on_error == "fail":
            raise UserError(f"{where}: {REASONS[reason]} (use --on-error skip to skip such documents)")
        self.counter.skipped[reason] += 1
        if len(self.counter.examples) < 20:
            self.counter.examples.append(f"{where}: {reason}")

    def from_text(self, text: str, doc_id: str, domain: str, src: InputSource, where: str,
                  scores: tuple[float, ...] = ()) -> Document | None:
        try:
            n_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates from JSON "\ud800" escapes
            self.skip("invalid_utf8", where)
            return None
        if not text.strip():
            self.skip("empty", where)
            return None
        return Document(text, doc_id, domain, src.source, scores, n_bytes)

    def from_record(self, rec: object, src: InputSource, where: str, default_id: str) -> Document | None:
        o = self.opts
        if not isinstance(rec, dict):
            self.skip("invalid_json", where)
            return None
        if o.text_field not in rec or rec[o.text_field] is None:
            self.skip("missing_text", where)
            return None
        text = rec[o.text_field]
        if not isinstance(text, str):
            self.skip("non_string_text", where)
            return None
        doc_id = rec.get(o.id_field)
        doc_id = default_id if doc_id is None else str(doc_id)
        domain = src.domain
        if o.domain_field:
            d = lookup(rec, o.domain_field)
            if d is None or d == "":
                self.domain_missing += 1
                if not self.domain_found:
                    if len(self.fields_seen) < 200:
                        self.fields_seen.update(dict.fromkeys(field_paths(rec)))
                    if o.on_error == "fail" or self.domain_missing >= DOMAIN_PROBE:
                        raise domain_field_error(o.domain_field, where, self.domain_missing,
                                                 list(self.fields_seen), first=True)
                self.skip("missing_domain", where)
                return None
            if not isinstance(d, str):
                self.skip("non_string_domain", where)
                return None
            self.domain_found += 1
            domain = d
        scores: tuple[float, ...] = ()
        if o.score_fields:
            vals = []
            for f in o.score_fields:
                v = rec.get(f)
                try:
                    x = float(v)  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    x = math.nan
                vals.append(x)
            scores = tuple(vals)
        doc = self.from_text(text, doc_id, domain, src, where, scores)
        if doc is not None:  # missing/non-numeric scores become NaN; counted so they are never silent
            self.counter.scores_missing += sum(math.isnan(x) for x in scores)
        return doc

    # --- formats -------------------------------------------------------------------------------------------
    def jsonl(self, src: InputSource) -> Iterator[Document]:
        try:
            with _open_binary(src.path) as f:
                for lineno, raw in enumerate(f, 1):
                    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]
                    where = f"{src.path}:{lineno}"
                    self.counter.docs_in += 1
                    if b"\x00" in raw:
                        self.skip("binary", where)
                        continue
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        self.skip("invalid_utf8", where)
                        continue
                    if not line.strip():
                        self.skip("empty", where)
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        self.skip("invalid_json", where)
                        continue
                    doc = self.from_record(rec, src, where, f"{src.source}:{lineno}")
                    if doc is not None:
                        yield doc
        except (OSError, EOFError) as e:  # corrupt / truncated gzip or zstd stream
            raise UserError(f"{src.path}: cannot read ({type(e).__name__}: {e})") from None
        except Exception as e:  # zstandard.ZstdError is not an OSError
            if type(e).__module__.startswith("zstandard") or "Zstd" in type(e).__name__:
                raise UserError(f"{src.path}: corrupt zstd stream ({e})") from None
            raise

    def _batches(self, src: InputSource, batches: Iterator, label: str) -> Iterator[Document]:
        row = 0
        for batch in batches:
            for rec in batch.to_pylist():
                row += 1
                self.counter.docs_in += 1
                doc = self.from_record(rec, src, f"{label} row {row}", f"{src.source}:{row}")
                if doc is not None:
                    yield doc

    def parquet(self, src: InputSource) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(src.path)
        except (pa.ArrowException, OSError) as e:  # ArrowInvalid for non-parquet bytes
            raise UserError(f"{src.path}: not a readable parquet file ({e})") from None
        names = set(pf.schema_arrow.names)
        dom = self.opts.domain_field
        if dom:
            paths = _schema_paths(list(pf.schema_arrow))
            if dom not in paths:  # the schema already says no row has it: stop before reading any
                raise domain_field_error(dom, str(src.path), pf.metadata.num_rows, paths)
        wanted = [self.opts.text_field, self.opts.id_field, dom or "", (dom or "").split(".")[0],
                  *self.opts.score_fields]
        cols = [c for c in dict.fromkeys(wanted) if c in names]
        yield from self._batches(src, pf.iter_batches(batch_size=1024, columns=cols), str(src.path))

    def arrow(self, src: InputSource) -> Iterator[Document]:
        import pyarrow as pa

        for f in src.files:
            try:
                reader = pa.ipc.open_stream(pa.memory_map(str(f)))
            except (pa.ArrowException, OSError):
                try:
                    reader = pa.ipc.open_file(pa.memory_map(str(f)))
                    reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
                except (pa.ArrowException, OSError) as e:
                    raise UserError(f"{f}: not a readable arrow file ({e})") from None
            yield from self._batches(src, reader, str(f))

    def txt_file(self, f: Path, src: InputSource, doc_id: str) -> Document | None:
        where = f"{f}:1"
        self.counter.docs_in += 1
        try:
            data = f.read_bytes()
        except OSError as e:
            raise UserError(f"{f}: cannot read ({e})") from None
        if b"\x00" in data:
            self.skip("binary", where)
            return None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            self.skip("invalid_utf8", where)
            return None
        return self.from_text(text, doc_id, src.domain, src, where)

    def read(self, src: InputSource) -> Iterator[Document]:
        yield from self._read(src)
        if self.domain_missing and not self.domain_found:  # fewer than DOMAIN_PROBE records, none had it
            raise domain_field_error(self.opts.domain_field or "", str(src.path), self.domain_missing,
                                     list(self.fields_seen))

    def _read(self, src: InputSource) -> Iterator[Document]:
        if src.kind == "jsonl":
            yield from self.jsonl(src)
        elif src.kind == "parquet":
            yield from self.parquet(src)
        elif src.kind == "arrow":
            yield from self.arrow(src)
        elif src.kind == "txt":
            doc = self.txt_file(src.path, src, src.path.stem)
            if doc is not None:
                yield doc
        elif src.kind == "txtdir":
            for f in src.files:
                doc = self.txt_file(f, src, f.relative_to(src.path).as_posix())
                if doc is not None:
                    yield doc
        else:  # pragma: no cover - expand_inputs only makes the kinds above
            raise ValueError(src.kind)


def iter_documents(src: InputSource, opts: ReadOptions, counter: SkipCounter) -> Iterator[Document]:
    """Documents of one source in file order; bad records are counted in `counter` (or raise, on_error=fail)."""
    if opts.on_error not in ("skip", "fail"):
        raise UserError(f"--on-error must be skip or fail, not {opts.on_error!r}")
    return _Reader(opts, counter).read(src)
