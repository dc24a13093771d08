"""`dwm analyze RUN_DIR [RUN_DIR ...] [--out DIR]`: the data-preference evolution of DWM runs (see report.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def run(args: argparse.Namespace) -> int:
    from dwm.analysis.report import analyze
    from dwm.analysis.runs import load_run

    dirs = [Path(d) for d in args.run_dirs]
    data = args.data or []
    if len(data) not in (0, 1, len(dirs)):
        raise UserError(f"--data given {len(data)} times for {len(dirs)} runs: give it once (all runs) or once "
                        f"per run")
    if args.examples < 0 or args.chars < 1:
        raise UserError("--examples must be >= 0 and --chars >= 1")
    per_run = data * len(dirs) if len(data) == 1 else (data or [None] * len(dirs))
    runs = [load_run(d, dd, label) for d, dd, label in zip(dirs, per_run, _labels(dirs))]
    out = Path(args.out) if args.out else dirs[0] / "analysis"
    report = analyze(runs, out, n_examples=args.examples, chars=args.chars)
    for r in runs:
        for note in r.notes:
            print(f"dwm analyze: {r.label}: {note}", file=sys.stderr)
    print(f"report: {report}", file=sys.stderr)
    return 0
