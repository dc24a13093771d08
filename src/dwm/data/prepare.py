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
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dwm.data import tokenizer as tkz
from dwm.data.encode import CHUNK_BYTES, chunks, default_workers, tokenized, tokenized_ray, tokenizer_sample
from dwm.data.formats import InputSource, expand_inputs
from dwm.data.packing import ROW_GROUP, SplitWriter
from dwm.data.pool import make_pool
from dwm.data.prepare_options import (
    FIXED_COLUMNS,
    FORMAT,
    OUTPUT_FILES,
    SPLITS,
    TMP_NAME,
    PrepareOptions,
    fingerprint,
    is_complete,
    is_val,
    parse_shard,
    select_shard,
)
from dwm.data.readers import DOMAIN_PROBE, SkipCounter
from dwm.errors import UserError, disk_full
from dwm.progress import Progress

# the names this module always offered, now kept in dwm.data.prepare_options, packing, encode and pool
__all__ = ["CHUNK_BYTES", "EPILOG", "FIXED_COLUMNS", "FORMAT", "OUTPUT_FILES", "ROW_GROUP", "SPLITS", "TMP_NAME",
           "PrepareOptions", "PreparedInfo", "SplitWriter", "add_arguments", "fingerprint", "is_complete", "is_val",
           "make_pool", "parse_shard", "prepare", "prepare_data", "run", "select_shard"]

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
            raise disk_full(e.filename or tmp, sum(_source_bytes(s) for s in sources), out,
                            "the output is about the inputs' size") from None
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
            tok = tkz.train_bpe(tokenizer_sample(sources, opts, bpe_progress), opts.vocab_size)
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
    workers = opts.workers or default_workers()
    from tqdm import tqdm

    bar = tqdm(unit="doc", desc="prepare", disable=(None if opts.progress is None else not opts.progress),
               dynamic_ncols=True)
    current = 0
    n_tokens_total = 0
    val_domains: set[str] = set()
    try:
        stream = (tokenized_ray(tok, sources, opts.read_options(), counter, workers, opts.ray_address)
                  if opts.engine == "ray" else tokenized(tok, chunks(sources, opts.read_options(), counter), workers))
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
