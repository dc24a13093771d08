"""The paper's four claims, read off a finished `dwm experiment` grid (prints markdown; not a test)

    .venv/bin/python benchmarks/paper_claims.py [runs/experiments/cpu-mini]

Claims (Yu et al., ICML 2025), each a paired comparison on the heldout passage loss (lower is better) against the
uniform cell of the same selection, model and seed:
- C1 DWM improves random selection: random | dwm vs random | uniform;
- C2 a DWM learned on one selection transfers to others: dsir | transfer and quality | transfer (the weighting
  models learned by random | dwm, replayed) vs their uniform cells;
- C3 a DWM learned with a small model transfers to a larger one: random | transfer from cpu-mini | cpu-small vs
  random | uniform | cpu-small;
- C4 the weights show the model's data preference moving stage by stage (the paper: from samples the model finds
  hard towards diverse ones): in the three random | dwm runs, per stage, the Spearman correlation of phi's weight
  with the LM's loss of the sample and with its diversity (bigram novelty within the probe set), and the target
  domain's mean weight.

Verdict rule (committed at ccad281, while the grid ran, when 3 of its 33 cells had finished; 3 seeds, so a paired
mean has 2 degrees of freedom: 2 s.e. is about an 80% two-sided t interval, 4.3 s.e. 95%):
- supported: below uniform in every seed and the mean beyond 2 s.e.;
- leaning supported: below uniform in every seed, the mean within 2 s.e.;
- contradicted: the mean above uniform beyond 2 s.e.;
- not supported: anything else.
C4 is supported when, for the LM loss or the diversity correlation, the change from the first to the last stage
has the same sign in every seed and its mean is beyond 2 s.e.; the domain reading is reported beside it.

Replication (fixed before its runs): fresh seeds 3-5 of `random` alone (`selections={random=""}`) give C1, C3 and
C4 again; each is judged by the same rule on seeds 3-5 alone and on all six seeds 0-5 (`--seeds 0 1 2 3 4 5`),
and the six-seed verdict is the one the README states.

Every difference is put next to the oracle's (`oracle = ...` in the grid: uniform on the static mixture that
knows the target), as the share of the uniform -> oracle gap it recovers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, git_commit

from dwm.experiment import mean_se


def verdict(diffs: list[float]) -> str:
    m, se = mean_se(diffs)
    if all(d < 0 for d in diffs):
        return "**supported**" if -m >= 2 * se else "**leaning supported**"
    if m > 0 and m >= 2 * se:
        return "**contradicted**"
    return "**not supported**"


def load_cells(grid: Path) -> dict[str, dict]:
    records = [json.loads(p.read_text()) for p in grid.glob("*/*/*/s*/cell.json")]
    return {r["cell"]: r for r in records}


def paired(cells: dict[str, dict], a: str, b: str, seeds: list[int], metric: str = "passage_loss") -> list[float]:
    """metric(a) - metric(b) per seed; a and b are cell keys without the seed (selection/weighting/model)."""
    return [cells[f"{a}/s{s}"]["metrics"][metric] - cells[f"{b}/s{s}"]["metrics"][metric] for s in seeds]


def fmt(diffs: list[float]) -> str:
    m, se = mean_se(diffs)
    return f"{m:+.4f} ± {se:.4f} ({abs(m) / se:.1f} s.e.)" if se > 0 else f"{m:+.4f}"


def claims_table(cells: dict[str, dict], seeds: list[int], oracle: list[float] | None) -> list[str]:
    rows = [
        ("C1 DWM improves random selection", "random/dwm/cpu-small", "random/uniform/cpu-small"),
        ("C2 a DWM learned on random transfers to DSIR", "dsir/transfer/cpu-small", "dsir/uniform/cpu-small"),
        ("C2 ... and to the quality classifier's selection", "quality/transfer/cpu-small",
         "quality/uniform/cpu-small"),
        ("C3 a DWM learned by cpu-mini transfers to cpu-small", "random/transfer/cpu-small",
         "random/uniform/cpu-small"),
        ("(DWM learned in the run on DSIR)", "dsir/dwm/cpu-small", "dsir/uniform/cpu-small"),
        ("(DWM learned in the run on the quality selection)", "quality/dwm/cpu-small", "quality/uniform/cpu-small"),
    ]
    gap = -statistics.fmean(oracle) if oracle else float("nan")
    out = [("| claim | cells | heldout passage loss, paired difference (mean ± s.e.) | per seed | share of the "
            "oracle gap | val-split loss difference | verdict |"), "|---|---|---|---|---:|---|---|"]
    for name, a, b in rows:
        if not all(f"{x}/s{s}" in cells for x in (a, b) for s in seeds):
            continue  # a grid without that selection (e.g. the fresh-seed replication of C1, C3 and C4)
        d = paired(cells, a, b, seeds)
        v = paired(cells, a, b, seeds, "val_loss")
        share = f"{100 * -statistics.fmean(d) / gap:.0f}%" if oracle else ""
        out.append(f"| {name} | {a} vs {b.split('/')[1]} | {fmt(d)} | {', '.join(f'{x:+.3f}' for x in d)} | "
                   f"{share} | {fmt(v)} | {verdict(d) if not name.startswith('(') else ''} |")
    if oracle:
        out.append(f"| (oracle: {cells[f'oracle/uniform/cpu-small/s{seeds[0]}']['row'].split(' |')[0]}, the "
                   f"headroom) | oracle vs random uniform | {fmt(oracle)} | "
                   f"{', '.join(f'{x:+.3f}' for x in oracle)} | 100% | "
                   f"{fmt(paired(cells, 'oracle/uniform/cpu-small', 'random/uniform/cpu-small', seeds, 'val_loss'))}"
                   f" | |")
    return out


def stage_table(grid: Path, seeds: list[int], target_domain: str) -> list[str]:
    """C4: per seed and stage, Spearman(weight, LM loss), Spearman(weight, diversity), the target domain's mean
    weight and rank; then the first -> last stage change per seed and the verdict."""
    import dwm

    out = [("| seed | stage | step | Spearman with LM loss | Spearman with diversity | "
            f"{target_domain}: mean weight (rank of 10) | top domain |"), "|---|---|---|---|---|---|---|"]
    change: dict[str, list[float]] = {"LM loss": [], "diversity (bigram novelty)": []}
    for s in seeds:
        run = grid / f"random/dwm/cpu-small/s{s}"
        summary = dwm.analyze([run], out=run / "analysis")
        stages = summary.runs[0]["stages"]
        for st in stages:
            w = st["mean_weight_by_domain"]
            rank = sorted(w, key=w.get, reverse=True).index(target_domain) + 1
            sp = {k: float("nan") if v is None else v for k, v in st["spearman"].items()}
            out.append(f"| {s} | {st['stage']} | {st['step']} | {sp.get('LM loss', float('nan')):+.2f} | "
                       f"{sp.get('diversity (bigram novelty)', float('nan')):+.2f} | "
                       f"{w[target_domain]:.2f} ({rank}) | {max(w, key=w.get)} |")
        for k, d in change.items():
            first, last = stages[0]["spearman"].get(k), stages[-1]["spearman"].get(k)
            d.append(float("nan") if first is None or last is None else last - first)
    out += ["", "| first -> last stage change of | per seed | mean ± s.e. | consistent sign, beyond 2 s.e. |",
            "|---|---|---|---|"]
    for k, d in change.items():
        m, se = mean_se(d)
        ok = (all(x > 0 for x in d) or all(x < 0 for x in d)) and abs(m) >= 2 * se
        out.append(f"| Spearman with {k} | {', '.join(f'{x:+.2f}' for x in d)} | {m:+.2f} ± {se:.2f} | "
                   f"{'yes' if ok else 'no'} |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("grid", nargs="?", default=str(REPO / "runs/experiments/cpu-mini"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--target-domain", default="books", help="the domain of the target (novels: books)")
    args = p.parse_args()
    grid = Path(args.grid)
    cells = load_cells(grid)
    has_oracle = all(f"oracle/uniform/cpu-small/s{s}" in cells for s in args.seeds)
    oracle = paired(cells, "oracle/uniform/cpu-small", "random/uniform/cpu-small", args.seeds) if has_oracle else None
    print(f"<!-- benchmarks/paper_claims.py {grid.name}, commit {git_commit()}, seeds {args.seeds} -->\n")
    print("\n".join(claims_table(cells, args.seeds, oracle)))
    print()
    print("\n".join(stage_table(grid, args.seeds, args.target_domain)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
