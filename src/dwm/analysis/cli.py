"""`dwm analyze RUN_DIR [RUN_DIR ...] [--out DIR]`: the data-preference evolution of DWM runs (see report.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dwm.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="DWM run directories (dwm train --out); two or more are shown side by side")
    p.add_argument("--out", default=None,
                   help="output directory for report.html, the PNGs and summary.json "
                        "(default: FIRST_RUN_DIR/analysis)")
    p.add_argument("--data", action="append", default=None, metavar="DIR",
                   help="prepared data directory the run trained on, when its config's data.dir has moved; once "
                        "for all runs or once per run, in order (default: each run's data.dir)")
    p.add_argument("--examples", type=int, default=3, help="highest- and lowest-weighted samples shown per stage")
    p.add_argument("--chars", type=int, default=300, help="characters of each example's decoded text")


def _labels(dirs: list[Path]) -> list[str]:
    """Run names, made unique with their parent directory (then an index) where two share a name."""
    labels = [d.resolve().name for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{d.resolve().parent.name}/{d.resolve().name}" for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{i + 1}: {lab}" for i, lab in enumerate(labels)]
    return labels


@dataclass
class Summary:
    """What `analyze_runs` (`dwm.analyze`) returns: where the report went and its summary.json (one entry per run:
    stages, per-domain probe weights, correlations, examples), plus what could not be read of each run."""

    out: Path
    report: Path
    runs: list[dict[str, Any]]
    plots: list[Path]
    notes: dict[str, list[str]] = field(default_factory=dict)


def analyze_runs(runs: str | Path | Sequence[str | Path], out: str | Path | None = None, *,
                 data: str | Path | Sequence[str | Path] | None = None, examples: int = 3,
                 chars: int = 300) -> Summary:
    """`dwm analyze` as a function: the data preferences of DWM runs per stage, side by side, as report.html, PNG
    plots and summary.json in `out` (default FIRST_RUN/analysis); returns a Summary. data: the prepared data
    directory the runs trained on when their config's data.dir has moved (one for all runs, or one per run).
    examples / chars: highest- and lowest-weighted samples shown per stage, characters of each. Bad input raises
    UserError."""
    from dwm.analysis.report import analyze
    from dwm.analysis.runs import load_run

    dirs = [Path(runs)] if isinstance(runs, (str, os.PathLike)) else [Path(r) for r in runs]
    if not dirs:
        raise UserError("no run directory to analyze")
    given = [] if data is None else [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if len(given) not in (0, 1, len(dirs)):
        raise UserError(f"--data given {len(given)} times for {len(dirs)} runs: give it once (all runs) or once "
                        f"per run")
    if examples < 0 or chars < 1:
        raise UserError("--examples must be >= 0 and --chars >= 1")
    per_run = given * len(dirs) if len(given) == 1 else (given or [None] * len(dirs))
    loaded = [load_run(d, dd, label) for d, dd, label in zip(dirs, per_run, _labels(dirs))]
    out_dir = Path(out) if out else dirs[0] / "analysis"
    report = analyze(loaded, out_dir, n_examples=examples, chars=chars)
    summary = json.loads((out_dir / "summary.json").read_text())
    return Summary(out=out_dir, report=report, runs=summary["runs"], plots=[out_dir / p for p in summary["plots"]],
                   notes={r.label: list(r.notes) for r in loaded})


def run(args: argparse.Namespace) -> int:
    res = analyze_runs(args.run_dirs, args.out, data=args.data, examples=args.examples, chars=args.chars)
    for label, notes in res.notes.items():
        for note in notes:
            print(f"dwm analyze: {label}: {note}", file=sys.stderr)
    print(f"report: {res.report}", file=sys.stderr)
    return 0
