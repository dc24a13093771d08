"""What a `dwm prepare` run is asked for and what decides its output: PrepareOptions (the options and their
checks), the prepared directory's format name, splits, fixed columns and files, the document-level train/val split
(`is_val`), the choice of a shard's input sources (`parse_shard`, `select_shard`) and the fingerprint of inputs and
options that tells a finished directory from one to redo (`fingerprint`, `is_complete`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dwm.data.formats import InputSource
from dwm.data.readers import ReadOptions
from dwm.errors import UserError

FORMAT = "dwm-prepared/1"
SPLITS = ("train", "val")
FIXED_COLUMNS = ("sample_id", "doc_id", "domain", "source", "n_tokens")
OUTPUT_FILES = ("tokenizer.json", "stats.json", *(f"{s}.{e}" for s in SPLITS for e in ("bin", "parquet")))
TMP_NAME = ".tmp-prepare"


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
