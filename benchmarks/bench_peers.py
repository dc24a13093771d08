"""DWM against its peers at equal compute: per-sample weighting against per-domain mixing and model-aware selection
(prints figures; not a test)

    .venv/bin/python benchmarks/bench_peers.py [--seeds 10 11 12] [--targets novels speech wiki] [--jobs 2]
    .venv/bin/python benchmarks/bench_peers.py --matched uniform    # then: the cheaper arms at DWM's compute

Methods, every one on the same model, budget, seeds and data stream (paired by seed):
- uniform: the stream as it comes;
- oracle: the static mixture of the target-like domain only (`static:1.0`, a selection manifest): the best of the
  share grid {0.25, 0.5, 1.0} on the reference side for novels and speech at both budgets measured
  (benchmarks/results/dwm.md), taken a priori for the third target;
- influence: MATES-style online selection (selector.mode = influence, its defaults: every 10 steps the better half
  of 2x candidates by influence on the reference loss);
- doge: DoGE-style exponentiated-gradient domain weights on the ghost hypergradient (weighting.mode = doge);
- odm: Online Data Mixing, EXP3 over domains on the training loss (weighting.mode = odm);
- dwm: the Data Weighting Model with the shipped defaults (backend fd, resample);
- dwm-ghost: the same with weighting.backend = ghost (every trained sample labelled, phi fits them at stage ends).
Two DWM variants ask where a gap to a per-domain peer comes from (`--methods dwm-kl0 dwm-ghost-online`): without
the KL pull toward uniform, and with phi fitted to the ghost labels every 10 steps (as DoGE updates every step).
doge, odm and the DWM arms draw each batch from 4x streamed candidates by their policy and train it at weight 1, so
the comparison between them isolates per-domain against per-sample.

Targets: novels (the shipped one), speech and wiki, each of the last two cut from a quarter of that domain's
documents with `dwm target build --from` and held out of the training corpus (bench_dwm.cut_target).

Figures per target: heldout passage loss per method (mean +- s.e.), the paired difference to uniform (+- s.e. and
per seed), the share of the uniform -> oracle gap, the whole-run cost against uniform (train wall time; runs train
`--jobs` at a time with 1 thread each, so a ratio of two runs is only side by side where they ran together), and the
target domain's rank among the domains by its mean share of the trained batches (methods that log shares).

Compute matching: `--matched ARM ...` trains those arms again with max_steps = round(steps x c), c = the median
whole-run cost of the `dwm` arm over every target and seed of this invocation (`--matched-cost` to give it): the
tokens DWM's overhead costs, given to the cheaper method. Printed as extra rows `ARM@c`.

FLOPs: `--flops` trains every method once more (the first target and seed, no evaluation) under torch's
FlopCounterMode and prints each one's counted FLOPs (matmuls and attention: forward, backward, the bi-level
update's and phi's passes, selection scoring) against uniform's; written to --out/flops.json and reported beside the
wall-time cost.

Runs are cached in --out by their resolved configuration (bench_dwm's cache): an interrupted invocation resumes.
Results are appended to benchmarks/results/peers.md with the date, commit and command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dwm as B
from benchlib import git_commit

REPO = B.REPO
RESULTS = REPO / "benchmarks" / "results" / "peers.md"
METHODS = ("uniform", "oracle", "influence", "doge", "odm", "dwm", "dwm-ghost")
# DWM variants that ask where a gap to a per-domain peer comes from (trained only when named in --methods)
EXTRAS = ("dwm-kl0", "dwm-ghost-online")


def method_cell(t: B.Target, method: str, seed: int, steps: int | None = None) -> B.Cell:
    """The bench cell of one method on one target and seed (`steps`: a compute-matched run of that length)."""
    ref = str(t.reference)
    arm, recipe, ov = {
        "uniform": ("uniform", "cpu-small-uniform", []),
        "oracle": ("static:1.0", "cpu-small-uniform", []),
        "influence": ("influence", "cpu-small-uniform", ["selector.mode=influence", f"influence.reference={ref}"]),
        "doge": ("doge", "cpu-small-uniform", ["weighting.mode=doge", f"doge.reference={ref}"]),
        "odm": ("odm", "cpu-small-uniform", ["weighting.mode=odm"]),
        "dwm": ("dwm", "cpu-small-dwm", []),
        "dwm-ghost": ("dwm-ghost", "cpu-small-dwm", ["weighting.backend=ghost"]),
        # no pull of phi's weights toward uniform
        "dwm-kl0": ("dwm-kl0", "cpu-small-dwm", ["weighting.advanced.kl=0"]),
        # phi fitted to the ghost labels every 10 steps instead of at the 5 stage starts, as DoGE updates often
        "dwm-ghost-online": ("dwm-ghost-online", "cpu-small-dwm", ["weighting.backend=ghost",
                                                                    "weighting.schedule=interleaved",
                                                                    "weighting.interval=10"]),
    }[method]
    if steps is not None:
        arm, ov = f"{arm}@{steps}", [*ov, f"train.max_steps={steps}"]
    return B.Cell(t.name, arm, seed, ov, recipe)


def rank_of(result: dict, domain: str, run_dir: Path) -> int | None:
    """The domain's rank (1 = most) by mean share of the trained batches, for runs that log shares."""
    from dwm.analysis.runs import trained_shares

    shares = trained_shares(run_dir)
    if not shares:
        return None
    return sorted(shares, key=lambda d: -shares[d]).index(domain) + 1 if domain in shares else len(shares) + 1


def count_flops(cell: B.Cell, target: B.Target, out: Path, budget: B.Budget) -> float:
    """Total FLOPs torch counts while the cell's run trains (in a worker process; no evaluation)."""
    import shutil

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dwm.run import build_trainer

    torch.set_num_threads(int(os.environ.get("DWM_BENCH_THREADS", "1")))
    flops_out = out / "flops"
    cfg = B.cell_config(cell, target, flops_out, budget)
    run = Path(cfg.out)
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    if cell.arm.startswith("static:"):
        B.write_static_manifest(cell, target, run, budget)
    trainer = build_trainer(cfg)
    with FlopCounterMode(display=False) as fc:
        trainer.train()
    return float(fc.get_total_flops())


def flops_table(targets: dict[str, B.Target], t: B.Target, seed: int, out: Path, budget: B.Budget,
                jobs: int) -> dict[str, float]:
    """{method: counted FLOPs of its run / uniform's} (cached in out/flops.json by budget)."""
    import json
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from dwm.host import die_with_parent

    path = out / "flops.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    key = f"{t.name}/{budget}/s{seed}"
    have = cache.get(key, {})
    todo = [m for m in METHODS if m not in have]
    if todo:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=die_with_parent) as ex:
            futs = {m: ex.submit(count_flops, method_cell(t, m, seed), t, out, budget) for m in todo}
            for m, f in futs.items():
                have[m] = f.result()
                print(f"[bench] flops {m}: {have[m]:.4g}", file=sys.stderr, flush=True)
        cache[key] = have
        path.write_text(json.dumps(cache, indent=1))
    return {m: have[m] / have["uniform"] for m in METHODS}


def signal_by_domain(run: Path) -> list[dict]:
    """Per stage of a ghost run: how much of the per-sample signal phi fitted is the sample's domain. `r2`: the
    between-domain share of its variance; `domain_spearman`: Spearman of a domain-mean predictor fitted on half of
    the stage's samples (by a hash of the id) with the signal of the other half; `phi_spearman`: phi's own score
    against the held-back samples of the stage (its "ghost_holdout" record; other samples, the same stage)."""
    import json

    import numpy as np
    import pyarrow.parquet as pq

    from dwm.weighting.diagnostics import corr, rank

    holdout = {r["stage"]: r["spearman_stage"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if r.get("event") == "ghost_holdout"}
    rows = []
    for f in sorted((run / "signal").glob("stage_*.parquet")):
        t = pq.read_table(f).to_pydict()
        k = int(f.stem.split("_")[1])
        sig, dom = np.asarray(t["signal"], dtype=np.float64), np.asarray(t["domain"])
        ids = np.asarray(t["sample_id"], dtype=np.uint64)
        means = {d: sig[dom == d].mean() for d in set(dom)}
        fitted = np.array([means[d] for d in dom])
        r2 = 1 - ((sig - fitted) ** 2).sum() / ((sig - sig.mean()) ** 2).sum()
        half = (ids * np.uint64(2654435761) % np.uint64(2)).astype(bool)
        train = {d: sig[~half & (dom == d)].mean() for d in set(dom[~half])}
        test = half & np.isin(dom, list(train))
        pred = np.array([train[d] for d in dom[test]])
        rows.append({"stage": k, "n": len(sig), "r2": float(r2),
                     "domain_spearman": corr(rank(pred), rank(sig[test])) if test.sum() > 2 else float("nan"),
                     "phi_spearman": holdout.get(k, float("nan"))})
    return rows


def signal_lines(t: B.Target, seeds: list[int], out: Path) -> list[str]:
    """The per-stage domain share of the ghost signal, mean over the seeds' dwm-ghost runs."""
    runs = [out / method_cell(t, "dwm-ghost", s).key for s in seeds]
    per = [signal_by_domain(r) for r in runs if (r / "signal").is_dir()]
    if not per:
        return []
    lines = ["", (f"ghost signal of dwm-ghost by stage (mean over {len(per)} seeds): between-domain share of its "
                  "variance (R²); Spearman with the signal of a domain-mean predictor (split half) and of phi (its "
                  "held-back samples)"), "", "| stage | samples | R² of domain | domain-mean Spearman | phi Spearman |",
             "|---|---|---|---|---|"]
    for k in range(max(len(x) for x in per)):
        rs = [x[k] for x in per if len(x) > k]
        m = {c: statistics.fmean(r[c] for r in rs) for c in ("n", "r2", "domain_spearman", "phi_spearman")}
        lines.append(f"| {k} | {m['n']:.0f} | {m['r2']:.2f} | {m['domain_spearman']:.2f} | {m['phi_spearman']:.2f} |")
    return lines


def report(results: dict[str, dict], t: B.Target, seeds: list[int], budget: B.Budget, out: Path,
           matched: dict[str, int], flops: dict[str, float] | None = None) -> str:
    key = "heldout_passage_loss"
    rows = [(m, method_cell(t, m, 0).arm) for m in METHODS]
    rows += [(m, method_cell(t, m, 0).arm) for m in EXTRAS
             if any((out / method_cell(t, m, s).key / "result.json").is_file() for s in seeds)]
    rows += [(f"{m}@{n}", method_cell(t, m, 0, n).arm) for m, n in matched.items()]
    have = {name: [results.get(B.Cell(t.name, arm, s).key) for s in seeds] for name, arm in rows}
    uni, orc = have["uniform"], have["oracle"]
    complete = [s for i, s in enumerate(seeds) if uni[i] and orc[i]]
    gaps = [u[key] - o[key] for u, o in zip(uni, orc, strict=True) if u and o]
    gap = statistics.fmean(gaps) if gaps else float("nan")
    lines = [f"### target `{t.name}` (its domain: `{t.domain}`), {budget}, seeds {seeds}", "",
             f"uniform -> oracle gap (heldout passage loss): {B.fmt(gaps) if len(gaps) > 1 else gaps}", "",
             ("| method | seeds | heldout passage loss | - uniform (paired) ± s.e. [per seed] | s.e.s | below uniform | "
              "share of oracle gap | cost / uniform (wall) | FLOPs / uniform | target's rank |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, arm in rows:
        rs = have[name]
        pairs = [(r, u, s) for r, u, s in zip(rs, uni, seeds, strict=True) if r and u]
        if not pairs:
            lines.append(f"| {name} | 0 | not run | | | | | | | |")
            continue
        vals = [r[key] for r, _, _ in pairs]
        diffs = [r[key] - u[key] for r, u, _ in pairs]
        m, se = B.mse(diffs)
        cost = statistics.median(r["train_seconds"] / u["train_seconds"] for r, u, _ in pairs)
        ranks = [rank_of(r, t.domain, out / B.Cell(t.name, arm, s).key) for r, _, s in pairs]
        lines.append(
            f"| {name} | {len(pairs)} | {B.fmt(vals)} | "
            + ("" if name == "uniform" else f"{m:+.4f} ± {se:.4f} {[round(x, 3) for x in diffs]}") + " | "
            + ("" if name == "uniform" or not se > 0 else f"{abs(m) / se:.1f}") + " | "
            + ("" if name == "uniform" else f"{sum(x < 0 for x in diffs)}/{len(diffs)}") + " | "
            + ("" if name == "uniform" or not gap > 0 else f"{-m / gap:.0%}") + f" | {cost:.2f} | "
            + (f"{flops[name]:.2f}" if flops and name in flops else "—") + " | "
            + (str(ranks) if any(x is not None for x in ranks) else "—") + " |")
    if len(complete) < len(seeds):
        lines += ["", f"(seeds with both uniform and oracle finished: {complete})"]
    lines += signal_lines(t, seeds, out)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12],
                   help="seeds, paired across methods (default: ones no default was chosen on)")
    p.add_argument("--targets", nargs="+", default=["novels", "speech", "wiki"], choices=["novels", "speech", "wiki"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRAS,
                   help=f"methods to train now (default: all but the DWM variants {', '.join(EXTRAS)})")
    p.add_argument("--matched", nargs="*", default=[], choices=METHODS,
                   help="also train these at DWM's compute (max_steps = steps x DWM's median cost)")
    p.add_argument("--matched-cost", type=float, default=None, help="the cost factor c (default: measured)")
    p.add_argument("--preset", default="cpu-mini", help="model preset (default: the demo's model)")
    p.add_argument("--steps", type=int, default=150, help="LM steps per run (default: the demo's)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="global batch in tokens (default: the demo's)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at a time (1 torch thread each)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "peers", help="run cache")
    p.add_argument("--no-report", action="store_true", help="train only (fills the cache)")
    p.add_argument("--flops", action="store_true", help="also count every method's training FLOPs (one seed)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    budget = B.Budget(args.steps, args.batch_tokens, args.preset)
    targets = B.prepare_targets(args.out)
    if "wiki" in args.targets:
        targets["wiki"] = B.cut_target(args.out / "wiki", "wiki", targets["novels"].data / "tokenizer.json")
    ts = [targets[n] for n in args.targets]
    cells = [method_cell(t, m, s) for t in ts for s in args.seeds for m in args.methods]
    results = B.run_all(cells, targets, args.out, budget, args.jobs)
    matched: dict[str, int] = {}
    if args.matched:
        c = args.matched_cost
        if c is None:
            cs = [results[method_cell(t, "dwm", s).key]["train_seconds"]
                  / results[method_cell(t, "uniform", s).key]["train_seconds"]
                  for t in ts for s in args.seeds if method_cell(t, "dwm", s).key in results
                  and method_cell(t, "uniform", s).key in results]
            if not cs:
                p.error("--matched needs the dwm and uniform arms (or --matched-cost)")
            c = statistics.median(cs)
        matched = {m: round(args.steps * c) for m in args.matched}
        more = [method_cell(t, m, s, n) for t in ts for s in args.seeds for m, n in matched.items()]
        results.update(B.run_all(more, targets, args.out, budget, args.jobs))
    flops = flops_table(targets, ts[0], args.seeds[0], args.out, budget, args.jobs) if args.flops else None
    if flops:
        print(f"FLOPs / uniform ({ts[0].name}, seed {args.seeds[0]}): "
              + ", ".join(f"{m} {r:.3f}" for m, r in flops.items()), file=sys.stderr)
    if args.no_report:
        return 0
    # every finished cell of these targets and seeds, whichever invocation trained it
    for t in ts:
        for s in args.seeds:
            for m in METHODS + EXTRAS:
                cell = method_cell(t, m, s)
                if cell.key not in results and (args.out / cell.key / "result.json").is_file():
                    import json

                    results[cell.key] = json.loads((args.out / cell.key / "result.json").read_text())
    text = "\n\n".join(report(results, t, args.seeds, budget, args.out, matched, flops) for t in ts)
    print(text)
    commit = git_commit()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(f"\n<!-- {time.strftime('%Y-%m-%d %H:%M')} {commit} bench_peers.py {' '.join(sys.argv[1:])} -->\n"
                f"{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
