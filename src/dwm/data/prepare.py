"""`dwm prepare`: documents -> fixed-length token samples (DIR/{split}.bin memmap) + metadata (DIR/{split}.parquet).

Output format: docs/ARCHITECTURE.md ("Prepared data directory"). Design points:
  * memory is bounded whatever the corpus size: documents stream from the readers in chunks of ~1 MB, a bounded
    number of chunks are being tokenized at once, rows are appended to the .bin file as they are cut and
    parquet metadata goes out in row groups;
  * the split is by document: hash(seed, doc_id) < val_fraction -> val, so a document never straddles splits
    and the split does not depend on input order or the number of workers;
  * everything is written into DIR/.tmp-prepare and moved into DIR at the end, meta.json last: a killed run
    leaves no meta.json, and its re-run starts clean and produces the same bytes as an uninterrupted run;
  * a finished DIR whose fingerprint (input paths, sizes, mtimes and the options) matches is not redone;
  * `--engine ray` reads and tokenizes as Ray Data tasks, one per input source (dwm/data/rayjobs.py), on a local
    Ray instance or a cluster; the driver writes in source order, so the directory is byte-identical;
  * `--shard I/N` prepares the I-th of N round-robin parts of the sorted input files into its own directory
    (shards after 0 need --tokenizer), and `--pool` makes a directory that reads a list of shards as one data
    set (dwm/data/dataset.py): SlimPajama-sized inputs on several machines, nothing copied.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dwm.data import tokenizer as tkz
from dwm.data.readers import (
    DOMAIN_PROBE,
    Document,
    InputSource,
    ReadOptions,
    SkipCounter,
    expand_inputs,
    iter_documents,
)
from dwm.errors import UserError
from dwm.progress import Progress

FORMAT = "dwm-prepared/1"
SPLITS = ("train", "val")
FIXED_COLUMNS = ("sample_id", "doc_id", "domain", "source", "n_tokens")
OUTPUT_FILES = ("tokenizer.json", "stats.json", *(f"{s}.{e}" for s in SPLITS for e in ("bin", "parquet")))
TMP_NAME = ".tmp-prepare"
CHUNK_BYTES = 1 << 20  # text per tokenization task: large enough to amortise overhead, small for memory
ROW_GROUP = 65536
# Test hook: hard-exit (like a kill) after this many documents have been written. Used by tests only.


@dataclass
class PrepareOptions:
    text_field: str = "text"
    id_field: str = "id"
    domain_field: str | None = None
    score_fields: tuple[str, ...] = ()
    tokenizer: str | None = None  # path to tokenizer.json / HF tokenizer dir; None: train a BPE
    vocab_size: int = 8192
    tokenizer_sample_mb: float = 32.0
    seq_len: int = 256
    val_fraction: float = 0.01
    packing: str = "stream"
    on_error: str = "skip"
    workers: int = 0  # 0: all cores
    engine: str = "local"  # "local": a thread pool; "ray": Ray Data tasks, one per input source
    ray_address: str | None = None  # engine "ray": a cluster address (None: a local Ray instance)
    seed: int = 0
    shard: tuple[int, int] | None = None  # (i, n): only the i-th of n parts of the sorted input files (see select_shard)
    force: bool = False
    progress: bool | None = None  # None: only on a terminal

    def validate(self) -> None:
        if self.seq_len < 2:
            raise UserError(f"--seq-len must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.packing not in ("stream", "doc"):
            raise UserError(f"--packing must be stream or doc, not {self.packing!r}")
        if self.on_error not in ("skip", "fail"):
            raise UserError(f"--on-error must be skip or fail, not {self.on_error!r}")
        if self.engine not in ("local", "ray"):
            raise UserError(f"--engine must be local or ray, not {self.engine!r}")
        if self.ray_address and self.engine != "ray":
            raise UserError("--ray-address needs --engine ray")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        if self.tokenizer_sample_mb <= 0:
            raise UserError("--tokenizer-sample-mb must be > 0")
        if self.shard is not None:
            i, n = self.shard
            if n < 1 or not 0 <= i < n:
                raise UserError(f"--shard {i}/{n}: want I/N with N >= 1 and 0 <= I < N (shards count from 0)")
            if i > 0 and not self.tokenizer:
                raise UserError(f"--shard {i}/{n} needs --tokenizer: a BPE trained on each shard would give ids that "
                                "mean different tokens in each; pass shard 0's DIR/tokenizer.json (or any tokenizer)")
        bad = [f for f in self.score_fields if f in FIXED_COLUMNS]
        if bad or len(set(self.score_fields)) != len(self.score_fields):
            raise UserError(f"--score-fields must be distinct and not named like a fixed column {FIXED_COLUMNS}")

    def read_options(self) -> ReadOptions:
        return ReadOptions(self.text_field, self.id_field, self.domain_field, tuple(self.score_fields),
                           self.on_error)


def is_val(doc_id: str, seed: int, val_fraction: float) -> bool:
    """Deterministic document-level split: a 64-bit hash of (seed, doc_id) against the fraction."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}\x00{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") < val_fraction * 2.0**64


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: want I/N, e.g. 0/8 (the first of 8 shards)") from None
    return i, n


def select_shard(sources: list[InputSource], shard: tuple[int, int]) -> list[InputSource]:
    """The sources of shard (i, n): the input sources sorted by resolved path, then every n-th starting at i (round
    robin: with many files of similar size, as SlimPajama's, the shards get about the same share). A source is a
    file (or a directory of .txt files, or a save_to_disk split): never cut."""
    i, n = shard
    ordered = sorted(sources, key=lambda s: str(s.path.resolve()))
    mine = ordered[i::n]
    if not mine:
        raise UserError(f"--shard {i}/{n}: the inputs hold only {len(ordered)} source file(s), none for shard {i}")
    return mine


# --- fingerprint / completion ---------------------------------------------------------------------------------
def _file_sig(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def fingerprint(sources: list[InputSource], opts: PrepareOptions) -> str:
    """Hash of what determines the output: input files (path, size, mtime) and the options that matter."""
    files = []
    for s in sources:
        files.extend(_file_sig(f) for f in (s.files or (s.path,)))
    o = asdict(opts)
    for k in ("workers", "force", "progress", "engine", "ray_address"):
        o.pop(k)
    if opts.tokenizer:
        tp = Path(opts.tokenizer)
        o["tokenizer"] = [_file_sig(f) for f in sorted(tp.iterdir()) if f.is_file()] if tp.is_dir() \
            else _file_sig(tp)
    blob = json.dumps({"format": FORMAT, "files": files, "options": o}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def is_complete(out: Path, fp: str) -> bool:
    """True when out/meta.json is a finished prepare with this fingerprint and all its files exist."""
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("fingerprint") == fp and all((out / f).is_file() for f in OUTPUT_FILES)


# --- writing ------------------------------------------------------------------------------------------------
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


# --- tokenization pipeline ----------------------------------------------------------------------------------
def _chunks(sources: list[InputSource], ropts: ReadOptions, counter: SkipCounter
            ) -> Iterator[tuple[int, list[Document]]]:
    """(source index, documents) chunks of about CHUNK_BYTES; a chunk never spans two sources."""
    for si, src in enumerate(sources):
        chunk: list[Document] = []
        size = 0
        for doc in iter_documents(src, ropts, counter):
            chunk.append(doc)
            size += doc.n_bytes
            if size >= CHUNK_BYTES or len(chunk) >= 4096:
                yield si, chunk
                chunk, size = [], 0
        if chunk:
            yield si, chunk


def _tokenized(tok, chunks: Iterator[tuple[int, list[Document]]], workers: int
               ) -> Iterator[tuple[int, list[Document], list[list[int]]]]:
    """Tokenize chunks in order. With workers > 1, a thread pool (tokenizers releases the GIL while encoding)
    with at most 2*workers chunks in flight, so memory stays bounded and the order is the input order."""
    if workers <= 1:
        for si, docs in chunks:
            yield si, docs, tkz.encode_batch(tok, [d.text for d in docs])
        return
    pending: deque[tuple[int, list[Document], Future]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="dwm-tok") as ex:
        for si, docs in chunks:
            pending.append((si, docs, ex.submit(tkz.encode_batch, tok, [d.text for d in docs])))
            if len(pending) >= 2 * workers:
                si0, docs0, fut = pending.popleft()
                yield si0, docs0, fut.result()
        while pending:
            si0, docs0, fut = pending.popleft()
            yield si0, docs0, fut.result()


def _tokenize_source(task: tuple) -> tuple[list[tuple[list[Document], list[list[int]]]], SkipCounter]:
    """A Ray task: read one source, cut it into the local engine's chunks and tokenize them (the same chunks and
    ids as `_tokenized`); returns them with the source's skip counter."""
    from tokenizers import Tokenizer

    src, ropts, tok_json = task
    tok = Tokenizer.from_str(tok_json)
    counter = SkipCounter()
    out = [(docs, tkz.encode_batch(tok, [d.text for d in docs])) for _, docs in _chunks([src], ropts, counter)]
    return out, counter


def _tokenized_ray(tok, sources: list[InputSource], ropts: ReadOptions, counter: SkipCounter, workers: int,
                   address: str | None) -> Iterator[tuple[int, list[Document], list[list[int]]]]:
    """`_tokenized` as Ray Data tasks, one per input source (a source is the unit of parallelism: split a large
    input into several files to spread it), yielded in source order; the skip counters are merged in that order,
    so the prepared directory is byte-identical to the local engine's. With on_error = fail, a bad record's error
    is raised by its task."""
    from dwm.data import rayjobs

    started = rayjobs.start(workers, address)
    try:
        tok_json = tok.to_str()
        results = rayjobs.imap(_tokenize_source, [(s, ropts, tok_json) for s in sources])
        for si, (chunks, c) in enumerate(results):
            counter.docs_in += c.docs_in
            counter.skipped.update(c.skipped)
            counter.examples.extend(c.examples[: max(0, 20 - len(counter.examples))])
            counter.scores_missing += c.scores_missing
            for docs, ids in chunks:
                yield si, docs, ids
    finally:
        if started:
            rayjobs.stop()


def _tokenizer_sample(sources: list[InputSource], opts: PrepareOptions, progress: Progress | None = None
                      ) -> Iterator[str]:
    """Bounded, deterministic training sample: the first share of each source's train documents (the document
    that fills the share is given whole). A document over tkz.PIECE_CHARS characters is given in pieces
    (tkz.iter_pieces: the same words) and only up to the share."""
    share = opts.tokenizer_sample_mb * 1e6 / len(sources)
    ropts = opts.read_options()
    for src in sources:
        taken = 0
        for doc in iter_documents(src, ropts, SkipCounter()):
            if is_val(doc.doc_id, opts.seed, opts.val_fraction):
                continue
            if len(doc.text) <= tkz.PIECE_CHARS:
                yield doc.text
                taken += doc.n_bytes
                if progress is not None:
                    progress.update(doc.n_bytes / 1e6)
            else:  # a very long document: its pieces until the source's share is taken
                for piece in tkz.iter_pieces(doc.text, tkz.PIECE_CHARS):
                    yield piece
                    n = len(piece.encode("utf-8", "surrogatepass"))
                    taken += n
                    if progress is not None:
                        progress.update(n / 1e6)
                    if taken >= share:
                        break
            if taken >= share:
                break


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --- main ---------------------------------------------------------------------------------------------------
def prepare(inputs: list[str | Path], out: str | Path, opts: PrepareOptions | None = None) -> dict:
    """Run `dwm prepare`; returns the meta.json dict. Raises UserError on bad inputs/options."""
    opts = opts or PrepareOptions()
    opts.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path exists and is not a directory: {out}")
    sources, ignored = expand_inputs(list(inputs))
    # an output directory inside an input directory (data/ --out data/prepared): never read our own output
    out_abs = out.resolve()
    inside = [s for s in sources if s.path.resolve().is_relative_to(out_abs)]
    if inside:
        sources = [s for s in sources if s not in inside]
        print(f"dwm prepare: not reading {len(inside)} file(s) inside the output directory {out}", file=sys.stderr)
        if not sources:
            raise UserError(f"all inputs lie inside the output directory {out}")
    if opts.shard is not None:
        sources = select_shard(sources, opts.shard)
    fp = fingerprint(sources, opts)
    if not opts.force and is_complete(out, fp):
        print(f"dwm prepare: {out} is already prepared from these inputs and options; nothing to do "
              "(--force to redo)")
        return json.loads((out / "meta.json").read_text())
    _refuse_other_corpus(out, inputs, opts.force)
    if ignored:
        print(f"dwm prepare: ignoring {len(ignored)} file(s) of unknown format in input directories, "
              f"e.g. {ignored[0]}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # from here on, DIR is not a finished prepare
    tmp = out / TMP_NAME
    shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftovers: start over, same result
    tmp.mkdir()
    try:
        return _prepare_into(out, tmp, sources, inputs, opts, fp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written temp directory behind
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            need = sum(_source_bytes(s) for s in sources)
            try:
                free = shutil.disk_usage(out).free
            except OSError:
                free = -1
            raise UserError(f"no space left on device writing {e.filename or tmp}: the output needs about "
                            f"{need:,} bytes (about the inputs' size), {free:,} free") from None
        raise
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _source_bytes(s: InputSource) -> int:
    try:
        return sum(f.stat().st_size for f in (s.files or (s.path,)) if f.is_file())
    except OSError:
        return 0


def _refuse_other_corpus(out: Path, inputs: list[str | Path], force: bool) -> None:
    """UserError when `out` holds a finished prepared directory (or pool) made from other inputs, unless force
    (the same inputs with other options or changed contents are simply redone)."""
    if force or not (out / "meta.json").is_file():
        return
    try:
        old = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(old, dict) or not str(old.get("format", "")).startswith(("dwm-prepared/", "dwm-pool/")):
        return
    mine = sorted(str(Path(p).resolve()) for p in inputs)
    theirs = sorted(old.get("inputs") or [f"the shards {[sh.get('dir') for sh in old.get('shards', [])]}"])
    if mine != theirs:
        raise UserError(f"{out} already holds a prepared corpus from other inputs ({', '.join(theirs[:3])}"
                        f"{' ...' if len(theirs) > 3 else ''}): pass --force to replace it, or choose another --out")


def _prepare_into(out: Path, tmp: Path, sources: list[InputSource], inputs: list[str | Path], opts: PrepareOptions,
                  fp: str) -> dict:
    t0 = time.time()

    if opts.tokenizer:
        tok, eos_id, pad_id = tkz.load_tokenizer(opts.tokenizer)
        bos_id, add_bos = tkz.bos_policy(tok, opts.tokenizer)
        tok_info = {"trained": False, "from": str(Path(opts.tokenizer).resolve())}
    else:
        with Progress("dwm prepare: training the BPE tokenizer", total=opts.tokenizer_sample_mb, unit="MB",
                      enabled=opts.progress) as bpe_progress:
            tok = tkz.train_bpe(_tokenizer_sample(sources, opts, bpe_progress), opts.vocab_size)
        eos_id, pad_id = tok.token_to_id(tkz.EOS), tok.token_to_id(tkz.PAD)
        bos_id, add_bos = None, False  # the trained BPE has no BOS (the shipped data's tokens are unchanged)
        tok_info = {"trained": True, "vocab_size_requested": opts.vocab_size,
                    "sample_mb": opts.tokenizer_sample_mb}
    tkz.set_bos_policy(tok, bos_id, add_bos)  # the saved tokenizer encodes text as the prepared rows hold it
    tok.save(str(tmp / "tokenizer.json"))
    n_vocab = tkz.vocab_size(tok)
    dtype = tkz.choose_dtype(n_vocab)

    scols = tuple(opts.score_fields)
    writers = {s: SplitWriter(tmp, s, opts.seq_len, dtype, eos_id, pad_id, opts.packing, scols,
                               bos_id if add_bos else None) for s in SPLITS}
    counter = SkipCounter()
    per_domain: dict[str, Counter] = defaultdict(Counter)
    docs_written = 0
    workers = opts.workers or _default_workers()
    from tqdm import tqdm

    bar = tqdm(unit="doc", desc="prepare", disable=(None if opts.progress is None else not opts.progress),
               dynamic_ncols=True)
    current = 0
    n_tokens_total = 0
    val_domains: set[str] = set()
    try:
        stream = (_tokenized_ray(tok, sources, opts.read_options(), counter, workers, opts.ray_address)
                  if opts.engine == "ray" else _tokenized(tok, _chunks(sources, opts.read_options(), counter), workers))
        for si, docs, ids_list in stream:
            if si != current:  # sources end in order; stream packing restarts per source
                for w in writers.values():
                    w.end_source()
                current = si
            for doc, ids in zip(docs, ids_list):
                split = "val" if is_val(doc.doc_id, opts.seed, opts.val_fraction) else "train"
                writers[split].add(doc, ids)
                if split == "val":
                    val_domains.add(doc.domain)
                st = per_domain[doc.domain]
                st["docs"] += 1
                st["tokens"] += len(ids) + 1 + add_bos
                st["bytes"] += doc.n_bytes
                n_tokens_total += len(ids) + 1 + add_bos
                docs_written += 1
            bar.update(len(docs))
            bar.set_postfix(tokens=f"{n_tokens_total:,}", skipped=counter.docs_skipped, refresh=False)
        for w in writers.values():
            w.close()
    finally:
        bar.close()

    if docs_written == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"no documents to prepare: {counter.docs_in} read, all skipped "
                        f"({dict(counter.skipped)})")
    if counter.docs_in != docs_written + counter.docs_skipped:  # a bug, not a user error: never lose silently
        raise AssertionError(f"docs_in {counter.docs_in} != written {docs_written} + skipped "
                             f"{counter.docs_skipped}")
    elapsed = time.time() - t0
    stats = {
        "docs_in": counter.docs_in,
        "docs_written": docs_written,
        "docs_skipped": counter.docs_skipped,
        "skipped": dict(sorted(counter.skipped.items())),
        "skip_examples": counter.examples,
        "scores_missing": counter.scores_missing,
        "tokens": n_tokens_total,
        "bytes": sum(d["bytes"] for d in per_domain.values()),
        "per_domain": {d: dict(sorted(c.items())) for d, c in sorted(per_domain.items())},
        "splits": {s: {"n_samples": w.n_samples, "n_docs": w.n_docs, "n_real_tokens": w.n_real_tokens,
                       "n_pad_tokens": w.n_samples * opts.seq_len - w.n_real_tokens}
                   for s, w in writers.items()},
    }
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    meta = {
        "format": FORMAT,
        "seq_len": opts.seq_len,
        "vocab_size": n_vocab,
        "dtype": dtype.name,
        "pad_id": int(pad_id),
        "eos_id": int(eos_id),
        "bos_id": None if bos_id is None else int(bos_id),
        "add_bos": bool(add_bos),
        "packing": opts.packing,
        "domains": sorted(per_domain),
        "sources": sorted({s.source for s in sources}),
        "score_columns": list(scols),
        "splits": {s: {"n_samples": w.n_samples, "n_docs": w.n_docs} for s, w in writers.items()},
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "tokenizer": tok_info,
        "inputs": [str(Path(p).resolve()) for p in inputs],
        "fingerprint": fp,
    }
    if opts.shard is not None:
        meta["shard"] = {"index": opts.shard[0], "count": opts.shard[1], "n_sources": len(sources)}
    for f in OUTPUT_FILES:
        os.replace(tmp / f, out / f)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp / "meta.json", out / "meta.json")  # last: its presence means "complete"
    shutil.rmtree(tmp, ignore_errors=True)

    mb = stats["bytes"] / 1e6
    print(f"dwm prepare: {docs_written:,} docs ({mb:.1f} MB, {n_tokens_total:,} tokens) -> "
          f"train {writers['train'].n_samples:,} / val {writers['val'].n_samples:,} samples of {opts.seq_len} "
          f"in {elapsed:.1f}s ({mb / max(elapsed, 1e-9):.2f} MB/s); skipped {counter.docs_skipped:,}"
          + (f" {dict(sorted(counter.skipped.items()))}" if counter.docs_skipped else ""))
    if writers["val"].n_samples == 0:
        print("dwm prepare: warning: the val split is empty (raise --val-fraction or add documents)",
              file=sys.stderr)
    elif 2 * len(val_domains) < len(per_domain):
        print(f"dwm prepare: warning: the val split ({writers['val'].n_docs:,} documents) covers only "
              f"{len(val_domains)} of {len(per_domain)} domains ({', '.join(sorted(val_domains))}): `dwm eval`'s "
              "per-domain val loss will miss the others (raise --val-fraction)", file=sys.stderr)
    if counter.skipped.get("missing_domain"):
        print(f"dwm prepare: warning: {counter.skipped['missing_domain']:,} records had no --domain-field "
              f"{opts.domain_field!r} (missing, null or empty) and were skipped (stats.json)", file=sys.stderr)
    return meta


EPILOG = """\
SlimPajama as it ships (train/chunk1..chunk10/example_train_N.jsonl.zst, set name at meta.redpajama_set_name),
in 8 shards that can run on 8 machines, then one pool that `dwm train data.dir=...` reads as one data set:
  dwm prepare SlimPajama-627B/train --domain-field meta.redpajama_set_name --shard 0/8 --out sp/shard0
  dwm prepare SlimPajama-627B/train --domain-field meta.redpajama_set_name --shard 3/8 \\
      --tokenizer sp/shard0/tokenizer.json --out sp/shard3          (likewise 1..7)
  dwm prepare --pool --out sp/pool sp/shard0 sp/shard1 ... sp/shard7
"""


# --- pool ---------------------------------------------------------------------------------------------------
def _merge_stats(stats: list[dict]) -> dict:
    """Numbers summed key by key (nested dicts too); what is not a number in every shard is left out."""
    out: dict = {}
    for k in dict.fromkeys(k for s in stats for k in s):
        vals = [s[k] for s in stats if k in s]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = sum(vals)
        elif all(isinstance(v, dict) for v in vals):
            out[k] = _merge_stats(vals)
    return out


def make_pool(shard_dirs: list[str | Path], out: str | Path) -> dict:
    """`dwm prepare --pool --out OUT SHARD_DIR...`: OUT becomes one data set made of the prepared shard directories
    (read in the order given; nothing is copied but the tokenizer). Checks that the shards share seq_len, vocab,
    dtype, pad/eos ids, score columns and the very same tokenizer.json. Returns the pool's meta.json dict."""
    from dwm.data.dataset import POOL_FORMAT, check_shards_agree, file_sha256, read_meta

    out = Path(out)
    if not shard_dirs:
        raise UserError("--pool needs the prepared shard directories as inputs")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path exists and is not a directory: {out}")
    shards: list[tuple[Path, dict]] = []
    seen: dict[Path, str] = {}
    for raw in shard_dirs:
        sd = Path(raw)
        m = read_meta(sd)
        if m["format"] == POOL_FORMAT:
            raise UserError(f"{sd} is itself a pool: list its shards instead")
        if sd.resolve() in seen:
            raise UserError(f"{sd} is listed twice (also as {seen[sd.resolve()]})")
        if sd.resolve() == out.resolve():
            raise UserError(f"the pool {out} cannot be one of its shards")
        if not (sd / "tokenizer.json").is_file():
            raise UserError(f"{sd}: missing tokenizer.json")
        seen[sd.resolve()] = str(raw)
        shards.append((sd, m))
    check_shards_agree(shards, "dwm prepare --pool")
    tok_sha = [file_sha256(sd / "tokenizer.json") for sd, _ in shards]
    for (sd, _), h in zip(shards, tok_sha):
        if h != tok_sha[0]:
            raise UserError(f"{sd}/tokenizer.json differs from {shards[0][0]}/tokenizer.json: the shards' ids mean "
                            "different tokens (prepare every shard with the same --tokenizer)")
    splits = list(shards[0][1]["splits"])
    for sd, m in shards:
        if sorted(m["splits"]) != sorted(splits):
            raise UserError(f"{sd} has splits {sorted(m['splits'])} but {shards[0][0]} has {sorted(splits)}")
    if (out / "meta.json").is_file():
        try:
            old = json.loads((out / "meta.json").read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("format") == FORMAT:
            raise UserError(f"{out} is a prepared directory, not a pool: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    m0 = shards[0][1]
    packings = {m.get("packing") for _, m in shards}
    entries = [{"dir": os.path.relpath(sd.resolve(), out.resolve()), "meta_sha256": file_sha256(sd / "meta.json"),
                "splits": m["splits"]} for sd, m in shards]
    meta = {
        "format": POOL_FORMAT,
        **{k: m0[k] for k in ("seq_len", "vocab_size", "dtype", "pad_id", "eos_id")},
        "packing": packings.pop() if len(packings) == 1 else "mixed",
        "domains": sorted({d for _, m in shards for d in m["domains"]}),
        "sources": sorted({s for _, m in shards for s in m.get("sources", [])}),
        "score_columns": list(m0.get("score_columns", [])),
        "splits": {s: {k: sum(int(m["splits"][s].get(k, 0)) for _, m in shards) for k in ("n_samples", "n_docs")}
                   for s in splits},
        "tokenizer": {**(m0["tokenizer"] if isinstance(m0.get("tokenizer"), dict) else {}),
                      "sha256": tok_sha[0]},
        "shards": entries,
        "fingerprint": hashlib.sha256(json.dumps([e["meta_sha256"] for e in entries]).encode()).hexdigest(),
    }
    (out / "meta.json").unlink(missing_ok=True)  # from here on, OUT is not a finished pool
    tmp = out / TMP_NAME
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copyfile(shards[0][0] / "tokenizer.json", tmp / "tokenizer.json")
    stats = []
    for sd, _ in shards:
        try:
            stats.append(json.loads((sd / "stats.json").read_text()))
        except (OSError, ValueError):
            pass
    (tmp / "stats.json").write_text(json.dumps({**_merge_stats(stats), "shards": len(shards)}, indent=2) + "\n")
    for f in ("tokenizer.json", "stats.json"):
        os.replace(tmp / f, out / f)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp / "meta.json", out / "meta.json")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"dwm prepare: pool {out} of {len(shards)} shards: "
          + " / ".join(f"{s} {meta['splits'][s]['n_samples']:,}" for s in splits)
          + f" samples of {meta['seq_len']}, {len(meta['domains'])} domains")
    return meta


@dataclass
class PreparedInfo:
    """What `prepare_data` (`dwm.prepare`) returns: the prepared directory (or pool) and its meta.json. Path-like:
    it can stand for the directory (`dwm.train(overrides={"data.dir": info})`)."""

    dir: Path
    meta: dict

    def __fspath__(self) -> str:
        return str(self.dir)

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def domains(self) -> list[str]:
        return list(self.meta["domains"])

    @property
    def is_pool(self) -> bool:
        return self.meta.get("format") != FORMAT

    def n_samples(self, split: str = "train") -> int:
        """Rows (samples of seq_len tokens) of a split."""
        return int(self.meta["splits"][split]["n_samples"])


def prepare_data(inputs: str | Path | Sequence[str | Path], out: str | Path, *, vocab_size: int = 8192,
                 seq_len: int = 256, tokenizer: str | Path | None = None, domain_field: str | None = None,
                 text_field: str = "text", id_field: str = "id", score_fields: str | Sequence[str] = (),
                 tokenizer_sample_mb: float = 32.0, val_fraction: float = 0.01,
                 packing: Literal["stream", "doc"] = "stream", on_error: Literal["skip", "fail"] = "skip",
                 workers: int = 0, engine: Literal["local", "ray"] = "local", ray_address: str | None = None,
                 seed: int = 0, shard: tuple[int, int] | str | None = None, force: bool = False,
                 progress: bool | None = None, pool: bool = False) -> PreparedInfo:
    """`dwm prepare` as a function: tokenize documents into fixed-length samples in `out`; returns PreparedInfo.

    inputs: .jsonl[.gz|.zst] / .parquet / .txt files or directories of them; with pool=True, prepared shard
    directories, and `out` becomes a pool that reads them as one data set (the other options do not apply).
    tokenizer: a tokenizer.json or HF tokenizer directory (None: train a byte-level BPE of vocab_size on the
    inputs). domain_field: the record field (a dotted path into nested objects) naming the domain (None: from the
    file name `<domain>__<source>.*`). score_fields: numeric fields kept as float64 columns (a list, or a
    comma-separated string). shard: (I, N) or "I/N", only the I-th of N parts of the sorted input files. The other
    options are `dwm prepare`'s (`dwm prepare --help`). A finished `out` prepared from the same inputs and options
    is not redone (unless force). Bad inputs or options raise UserError."""
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if pool:
        if shard:
            raise UserError("--pool takes prepared shard directories: --shard does not apply")
        return PreparedInfo(Path(out), make_pool(paths, out))
    if isinstance(score_fields, str):
        score_fields = score_fields.split(",")
    opts = PrepareOptions(
        text_field=text_field, id_field=id_field, domain_field=domain_field,
        score_fields=tuple(f.strip() for f in score_fields if f.strip()),
        tokenizer=None if tokenizer is None else os.fspath(tokenizer), vocab_size=vocab_size,
        tokenizer_sample_mb=tokenizer_sample_mb, seq_len=seq_len, val_fraction=val_fraction, packing=packing,
        on_error=on_error, workers=workers, engine=engine, ray_address=ray_address, seed=seed,
        shard=(parse_shard(shard) if shard else None) if isinstance(shard, str) else shard, force=force, progress=progress)
    return PreparedInfo(Path(out), prepare(paths, out, opts))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".jsonl[.gz|.zst] / .parquet / .txt files, directories of them (walked recursively), or "
                        "save_to_disk dirs; with --pool: prepared shard directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--text-field", default="text", help="record field holding the document text")
    p.add_argument("--id-field", default="id", help="document id field (default id; else <source>:<line>)")
    p.add_argument("--domain-field", default=None,
                   help="domain from this record field; a dotted path reads nested objects and parquet structs "
                        "(meta.redpajama_set_name). A record without it (or null / empty) is skipped as "
                        "missing_domain, one whose value is not a string as non_string_domain (stats.json); a file "
                        f"whose first {DOMAIN_PROBE} records (or all, if fewer) all lack it stops the run, naming "
                        "the fields found (default: from the file name <domain>__<source>.*)")
    p.add_argument("--score-fields", default="", help="comma-separated numeric fields carried as float64 columns "
                                                      "(default: none)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or HF tokenizer directory (default: train a "
                                                     "byte-level BPE on the inputs)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocab size of the trained BPE")
    p.add_argument("--tokenizer-sample-mb", type=float, default=32.0,
                   help="MB of text used to train the BPE, shared equally between sources")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample (row of the memmap)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of documents (by a seeded hash of the id) held out as the val split")
    p.add_argument("--packing", choices=("stream", "doc"), default="stream",
                   help="stream: concatenate a source's documents and cut into rows; doc: pad each document's "
                        "last row")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="bad input records: count and skip them, or stop at the first with file:line")
    p.add_argument("--workers", type=int, default=0, help="tokenizer threads (default 0: all cores)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="tokenize with a local thread pool, or as Ray Data tasks (one per input source; same output)")
    p.add_argument("--ray-address", default=None,
                   help="with --engine ray: a Ray cluster address (default: a local Ray instance)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="prepare only shard I of N (0 <= I < N): the input files sorted by path, every N-th from the "
                        "I-th; shard 0 may train the BPE, the others need --tokenizer (shard 0's tokenizer.json)")
    p.add_argument("--pool", action="store_true",
                   help="the INPUTs are prepared shard directories: make --out a pool that reads them as one data "
                        "set (same tokenizer, seq_len, dtype checked; nothing is copied)")
    p.add_argument("--force", action="store_true", help="redo even if DIR is already prepared")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    prepare_data(args.inputs, args.out, pool=args.pool, text_field=args.text_field, id_field=args.id_field,
                 domain_field=args.domain_field, score_fields=args.score_fields, tokenizer=args.tokenizer,
                 vocab_size=args.vocab_size, tokenizer_sample_mb=args.tokenizer_sample_mb, seq_len=args.seq_len,
                 val_fraction=args.val_fraction, packing=args.packing, on_error=args.on_error, workers=args.workers,
                 engine=args.engine, ray_address=args.ray_address, seed=args.seed, shard=args.shard,
                 force=args.force, progress=False if args.no_progress else None)
    return 0
