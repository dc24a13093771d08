"""Read a DWM run directory for analysis: its config.toml, weighting/stage_k.json, probes/stage_k.parquet,
signal/stage_k.parquet (where the run wrote them), its tokenizer.json, and the prepared data it trained on (config
data.dir, or --data).

Everything a bad input can be (not a run, a uniform run, no probes yet, a data directory that is gone or is not the
one the run trained on) is a one-line UserError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dwm import rundir
from dwm.analysis.measures import bigram_novelty
from dwm.data.dataset import PreparedData
from dwm.errors import UserError
from dwm.metrics import read_metrics


@dataclass
class Stage:
    """One stage's probe set: rows aligned with RunData.ids (the probe set is the same at every stage)."""

    k: int
    step: int
    total_steps: int
    updates: int
    skipped: int
    weight: np.ndarray
    score: np.ndarray
    lm_loss: np.ndarray | None  # None: the run's probes predate the lm_loss column
    # the hypergradient signal of the samples this stage's bi-level updates probed (signal/stage_k.parquet):
    # (domain name per sample, -dL/dw on phi's scale); None: no update in this stage, or a run from before the file
    signal: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class RunData:
    dir: Path
    label: str
    mode: str
    data_dir: Path
    split: str
    domains: list[str]
    ids: np.ndarray  # probe sample ids (sorted)
    domain: np.ndarray  # [n] domain name per probe sample
    n_tokens: np.ndarray
    novelty: np.ndarray  # bigram novelty within the probe set (dwm.analysis.measures)
    scores: dict[str, np.ndarray]  # the prepared data's score columns
    stages: list[Stage]
    notes: list[str] = field(default_factory=list)
    _data: PreparedData | None = None
    _tokenizer: Any = None

    @property
    def has_lm_loss(self) -> bool:
        return all(s.lm_loss is not None for s in self.stages)

    def text(self, sample_id: int, chars: int = 300) -> str:
        """The sample's decoded text (real tokens only), cut to `chars` characters."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(rundir.RunDir(self.dir).tokenizer))
        assert self._data is not None
        n = int(self._data.n_tokens[sample_id])
        text = self._tokenizer.decode(np.asarray(self._data.tokens[sample_id, :n]).tolist())
        return text if len(text) <= chars else text[:chars] + "…"


def _resolve_data_dir(run: Path, configured: str, override: str | Path | None) -> Path:
    if override is not None:
        d = Path(override)
        if not d.is_dir():
            raise UserError(f"--data {d} does not exist")
        return d
    d = Path(configured)
    if d.is_dir():
        return d
    raise UserError(f"{run}: its prepared data dir {configured!r} (data.dir in config.toml) does not exist "
                    f"here; pass --data DIR")


def trained_shares(run_dir: str | Path) -> dict[str, float]:
    """Each domain's mean share of the trained loss over a weighted run's logged steps (with weighting.apply =
    resample: its share of the samples trained on), from RUN_DIR/metrics.jsonl; a domain absent from a logged step
    counts 0 there. {} when the run logged no weighted steps (uniform, static, or no metrics.jsonl); a line that
    is not JSON (the torn last line of a killed run) is skipped, as `dwm eval` does."""
    steps = [r for r in read_metrics(rundir.RunDir(run_dir).metrics)
             if "loss" in r and any(k.startswith("share/") for k in r)]
    doms = sorted({k.removeprefix("share/") for r in steps for k in r if k.startswith("share/")})
    return {d: sum(r.get(f"share/{d}", 0.0) for r in steps) / len(steps) for d in doms} if steps else {}


def load_run(run_dir: str | Path, data_dir: str | Path | None = None, label: str | None = None) -> RunData:
    """The probes of every stage of a DWM run and the properties of its probe samples."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    rd = rundir.RunDir(run)
    if not rd.config.is_file():
        raise UserError(f"{run} is not a run directory (no config.toml; `dwm train --out` writes one)")
    cfg = rd.settings()
    mode = cfg.weighting_mode
    metas = rundir.stage_map(rd.weighting, ".json")
    probes = rundir.stage_map(rd.probes, ".parquet")
    if not metas and not probes:
        why = "it was trained with weighting.mode = uniform" if mode == "uniform" else "it has no weighting/ stages"
        raise UserError(f"{run} is not a DWM run ({why}): nothing to analyze")
    if not probes:
        raise UserError(f"{run} has no probes/stage_*.parquet (weighting.probe_size = 0, or the run stopped before "
                        f"its first stage)")
    ddir = _resolve_data_dir(run, cfg.data_dir or "data/prepared", data_dir)
    split = cfg.split
    data = PreparedData(ddir, split)
    if not rd.tokenizer.is_file():
        raise UserError(f"{run}: missing tokenizer.json")

    notes: list[str] = []
    tables = {}
    for k, p in probes.items():
        t = rundir.read_table(p)
        missing = {"sample_id", "domain", "weight"} - set(t.column_names)
        if missing:
            raise UserError(f"{p}: missing column(s) {sorted(missing)}")
        tables[k] = t
    ids = np.unique(np.concatenate([t.column("sample_id").to_numpy() for t in tables.values()])).astype(np.int64)
    if len(ids) == 0:
        raise UserError(f"{run}: its probe sets are empty")
    if ids.min() < 0 or ids.max() >= len(data):
        raise UserError(f"{run}: probe sample ids reach {ids.max()}, but {ddir} split {split!r} has {len(data)} "
                        f"rows: not the data this run trained on (pass it with --data)")
    domain = np.asarray(data.domains, dtype=object)[data.domain_ids[ids]]
    for k, t in tables.items():
        sid = t.column("sample_id").to_numpy()
        if list(np.asarray(data.domains, dtype=object)[data.domain_ids[sid]]) != t.column("domain").to_pylist():
            raise UserError(f"{run}: the domains of its probes differ from {ddir}'s rows: not the data this run "
                            f"trained on (pass it with --data)")

    stages = []
    for k, t in tables.items():
        meta = {}
        if k in metas:
            try:
                meta = json.loads(metas[k].read_text()).get("dwm", {})
            except (OSError, json.JSONDecodeError):
                notes.append(f"weighting/stage_{k}.json unreadable: stage step taken from the probes")
        pos = np.searchsorted(ids, t.column("sample_id").to_numpy())

        def aligned(col: str, pos=pos, t=t) -> np.ndarray:
            out = np.full(len(ids), np.nan)
            out[pos] = t.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
            return out

        steps = t.column("step").to_numpy() if "step" in t.column_names else np.zeros(1, np.int64)
        stages.append(Stage(
            k=k, step=int(meta.get("step", steps[0] if len(steps) else 0)),
            total_steps=int(meta.get("total_steps", 0)), updates=int(meta.get("updates", 0)),
            skipped=int(meta.get("skipped", 0)), weight=aligned("weight"),
            score=aligned("score") if "score" in t.column_names else np.full(len(ids), np.nan),
            lm_loss=aligned("lm_loss") if "lm_loss" in t.column_names else None))
    for st in stages:
        path = rd.signal_file(st.k)
        if path.is_file():
            t = rundir.read_table(path, columns=["domain", "signal"])
            st.signal = (np.asarray(t.column("domain").to_pylist(), dtype=object),
                         t.column("signal").to_numpy().astype(np.float64))
    if not all(s.lm_loss is not None for s in stages):
        notes.append("its probes have no lm_loss column (trained with weighting.advanced.probe_lm_loss = false, or "
                     "from before probes recorded the LM's per-sample loss): the weight-vs-LM-loss correlation is "
                     "skipped")

    rows = np.asarray(data.tokens[ids], dtype=np.int64)
    n_tok = data.n_tokens[ids]
    cols = [c for c in data.score_columns if c in data.table.column_names]
    scores = {c: data.table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)[ids] for c in cols}
    return RunData(dir=run, label=label or run.name, mode=mode, data_dir=ddir, split=split,
                   domains=sorted(set(domain)), ids=ids, domain=domain, n_tokens=n_tok.astype(np.float64),
                   novelty=bigram_novelty(rows, n_tok), scores=scores, stages=stages, notes=notes, _data=data)
