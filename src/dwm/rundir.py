"""The run directory (`dwm train --out RUN_DIR`): its paths and the schemas of the files the weighting writes,
used by the writers (trainer, weighter) and the readers (`dwm analyze`, `dwm eval`, `dwm demo`, benchmarks) alike.
docs/ARCHITECTURE.md lists the layout. At the bottom layer: it imports nothing of dwm but errors and config.

    RUN_DIR/config.toml, tokenizer.json, metrics.jsonl, eval.json, analysis/
    RUN_DIR/checkpoints/LATEST, checkpoints/step_NNNNNNNN/{model/, trainer_state.pt}
    RUN_DIR/weighting/stage_k.{safetensors,json}   phi of stage k (+ its config and STAGE_META)
    RUN_DIR/probes/stage_k.parquet                  PROBE_COLUMNS
    RUN_DIR/signal/stage_k.parquet                  SIGNAL_COLUMNS
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwm.config import read_toml
from dwm.errors import UserError

# column -> arrow type name, in file order; `lm_loss` is optional (weighting.advanced.probe_lm_loss)
PROBE_COLUMNS = {"sample_id": "int64", "domain": "string", "score": "float32", "weight": "float32",
                 "stage": "int32", "step": "int64", "lm_loss": "float32"}
SIGNAL_COLUMNS = {"sample_id": "int64", "domain": "string", "dL_dw": "float64", "signal": "float64",
                  "stage": "int32", "step": "int64"}
# the "dwm" object of weighting/stage_k.json, next to the network's own config
STAGE_META = ("stage", "stages", "step", "total_steps", "fraction", "temperature", "floor", "domains",
              "tokenizer_sha256", "updates", "skipped", "source")


def stage_of_name(p: Path) -> int | None:
    """k of a `stage_k.*` file name, None for any other name."""
    try:
        return int(p.name.split(".")[0].split("_", 1)[1]) if p.name.startswith("stage_") else None
    except (IndexError, ValueError):
        return None


def stage_files(d: Path, suffix: str) -> list[Path]:
    """The stage_k{suffix} files of a folder, by k (files of another name are not stages)."""
    found = [(stage_of_name(p), p) for p in Path(d).glob(f"stage_*{suffix}")]
    return [p for k, p in sorted((k, p) for k, p in found if k is not None and p.name.endswith(suffix))]


def stage_map(d: Path, suffix: str) -> dict[int, Path]:
    """{k: stage_k{suffix}} of a folder, by k."""
    return {stage_of_name(p): p for p in stage_files(d, suffix)}


def read_table(path: Path, columns: list[str] | None = None):
    """A parquet file of the run directory (a pyarrow table); an unreadable one is a UserError naming it."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except Exception as e:  # noqa: BLE001 (pyarrow raises several types for a torn or foreign file)
        raise UserError(f"cannot read {path}: {e}") from None


def arrow_table(columns: dict[str, Any], schema: dict[str, str]):
    """A pyarrow table of `columns` (arrays or lists) in the schema's order and types; a column the schema does
    not know is a programming error."""
    import pyarrow as pa

    unknown = set(columns) - set(schema)
    assert not unknown, f"columns outside the run directory's schema: {sorted(unknown)}"
    return pa.table({k: pa.array(columns[k], getattr(pa, schema[k])()) for k in schema if k in columns})


def write_parquet_atomic(table, out: Path) -> None:
    """Write a parquet file through a temporary name, so a reader never sees half of it."""
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)


@dataclass
class RunSettings:
    """What a run's readers (`dwm eval`, `dwm analyze`) take from its config.toml, typed; the full config is
    dwm.run.RunConfig, which readers below the run layer do not import."""

    data_dir: str | None = None  # data.dir
    split: str = "train"  # data.split
    global_batch_tokens: int | None = None  # train.global_batch_tokens
    weighting_mode: str = "uniform"  # weighting.mode
    reference: str | None = None  # weighting.reference

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> RunSettings:
        data, train, w = cfg.get("data", {}), cfg.get("train", {}), cfg.get("weighting", {})
        gbt = train.get("global_batch_tokens")
        return cls(data_dir=data.get("dir"), split=str(data.get("split", "train")),
                   global_batch_tokens=gbt if isinstance(gbt, int) else None,
                   weighting_mode=str(w.get("mode", "uniform")), reference=w.get("reference"))


class RunDir:
    """The paths of one run directory (nothing is created or read by building it)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.toml")
    tokenizer = property(lambda self: self.root / "tokenizer.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    eval_json = property(lambda self: self.root / "eval.json")
    analysis = property(lambda self: self.root / "analysis")
    checkpoints = property(lambda self: self.root / "checkpoints")
    weighting = property(lambda self: self.root / "weighting")
    probes = property(lambda self: self.root / "probes")
    signal = property(lambda self: self.root / "signal")

    def stage_stem(self, k: int) -> Path:
        """weighting/stage_k (add .safetensors / .json)."""
        return self.weighting / f"stage_{k}"

    def probe_file(self, k: int) -> Path:
        return self.probes / f"stage_{k}.parquet"

    def signal_file(self, k: int) -> Path:
        return self.signal / f"stage_{k}.parquet"

    def latest_checkpoint(self) -> Path | None:
        """checkpoints/<LATEST>, or None before the first complete checkpoint."""
        p = self.checkpoints / "LATEST"
        return self.checkpoints / p.read_text().strip() if p.is_file() else None

    def settings(self) -> RunSettings:
        """config.toml's settings the readers use (the defaults when there is no config.toml)."""
        return RunSettings.from_dict(read_toml(self.config) if self.config.is_file() else {})
