"""Input formats: which files and directories `dwm prepare` (and `dwm target build --from`, `dwm select`'s DSIR
target) can read and the units they are read in. `InputSource` is one unit (a JSONL or parquet file, a .txt file,
a directory of .txt files, the arrow files of a `datasets.save_to_disk` directory); `expand_inputs` walks the
path arguments (directories recursively, prepared directories skipped) into sources with distinct names;
`domain_source_from_name` reads the domain and source from a file name `<domain>__<source>.*`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dwm.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
HF_MARKERS = ("state.json", "dataset_dict.json")


@dataclass(frozen=True)
class InputSource:
    """One unit of input: a file, a directory of .txt files, or an HF arrow file. Packing streams per source."""

    path: Path
    kind: str  # "jsonl" | "parquet" | "txt" | "txtdir" | "arrow"
    domain: str
    source: str
    files: tuple[Path, ...] = ()  # for txtdir / arrow: the member files, in order
def domain_source_from_name(name: str) -> tuple[str, str]:
    """`<domain>__<source>.jsonl.zst` -> (domain, source); otherwise (stem, stem)."""
    stem = name
    for suf in (*JSONL_SUFFIXES, ".parquet", ".txt", ".arrow"):
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
            break
    if "__" in stem:
        domain, source = stem.split("__", 1)
        if domain and source:
            return domain, source
    return stem, stem


def _hf_source(d: Path) -> list[InputSource]:
    """A save_to_disk directory: a Dataset (state.json lists the arrow files) or a DatasetDict (one per split)."""
    domain, source = domain_source_from_name(d.name)
    if (d / "dataset_dict.json").is_file():
        splits = json.loads((d / "dataset_dict.json").read_text()).get("splits", [])
        out = []
        for s in splits:
            for src in _hf_source(d / s):
                out.append(InputSource(src.path, "arrow", domain, f"{source}/{s}", src.files))
        return out
    try:
        state = json.loads((d / "state.json").read_text())
        files = tuple(d / f["filename"] for f in state["_data_files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{d}: not a readable datasets.save_to_disk directory ({e})") from None
    for f in files:
        if not f.is_file():
            raise UserError(f"{d}: arrow file {f.name} listed in state.json is missing")
    return [InputSource(d, "arrow", domain, source, files)]


def _file_kind(p: Path) -> str | None:
    name = p.name
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "txt"
    return None


def _is_prepared(meta_json: Path) -> bool:
    try:
        return json.loads(meta_json.read_text()).get("format") in ("dwm-prepared/1", "dwm-pool/1")
    except (OSError, ValueError, AttributeError):
        return False


def expand_inputs(paths: list[str | Path]) -> tuple[list[InputSource], list[Path]]:
    """Resolve CLI input arguments into ordered sources. Returns (sources, ignored files in directories)."""
    sources: list[InputSource] = []
    ignored: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"input path does not exist: {p}")
        if p.is_file():
            kind = _file_kind(p)
            if kind is None:
                raise UserError(f"{p}: unsupported input format (expected .jsonl[.gz|.zst], .parquet, .txt, "
                                "a directory of them, or a datasets.save_to_disk directory)")
            sources.append(InputSource(p, kind, *domain_source_from_name(p.name)))
            continue
        if any((p / m).is_file() for m in HF_MARKERS):
            sources.extend(_hf_source(p))
            continue
        # hidden files and folders (e.g. a prepare's .tmp-prepare) are never inputs
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        # nor is a prepared directory or pool found inside (another shard's output next to the inputs)
        prepared = [f.parent for f in files if f.name == "meta.json" and _is_prepared(f)]
        if prepared:
            files = [f for f in files if not any(f.is_relative_to(d) for d in prepared)]
        txt = tuple(f for f in files if _file_kind(f) == "txt")
        n_before = len(sources)
        for f in files:
            kind = _file_kind(f)
            if kind in ("jsonl", "parquet"):
                sources.append(InputSource(f, kind, *domain_source_from_name(f.name)))
            elif kind is None:
                ignored.append(f)
        if txt:
            sources.append(InputSource(p, "txtdir", *domain_source_from_name(p.name), files=txt))
        if len(sources) == n_before:
            raise UserError(f"{p}: directory holds no .jsonl[.gz|.zst], .parquet or .txt files")
    if not sources:
        raise UserError("no input given")
    return _distinct_sources(sources), ignored


def _distinct_sources(sources: list[InputSource]) -> list[InputSource]:
    """Sources that share a name (SlimPajama's chunk1/example_train_0 and chunk2/example_train_0) are named by
    as many parent folders as make them distinct ("chunk1/example_train_0"): a source name is also the default
    doc_id prefix, so it must be unique. Unique names are kept as they are."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        groups.setdefault(s.source, []).append(i)
    out = list(sources)
    for name, idx in groups.items():
        if len(idx) < 2:
            continue
        parents = [sources[i].path.resolve().parent.parts for i in idx]
        for k in range(1, max(len(p) for p in parents) + 1):
            names = ["/".join((*p[len(p) - k:], name)) for p in parents]
            if len(set(names)) == len(names):
                break
        for i, n in zip(idx, names):
            out[i] = InputSource(sources[i].path, sources[i].kind, sources[i].domain, n, sources[i].files)
    return out
