"""DWM benchmarks on the shipped corpus (prints figures; not a test).

    python benchmarks/bench_dwm.py [--seeds 0 1 2] [--steps 150]

For each seed, a uniform and a DWM run of `cpu-small` on the same data, order and token budget (recipes
cpu-small-uniform / cpu-small-dwm, default DWM schedule), back to back in this one process:

- amortised overhead: wall time of the DWM run (weighting forward on every batch + M bi-level updates at each of
  5 stage starts) over the uniform run's, per seed, median reported (goal <= 1.15). Probe scoring at stage
  boundaries is analysis output, not part of the method: timed separately and excluded.
- quality: both runs evaluated on the `heldout` target split (never seen by the weighting model: it optimises
  against `reference`, other books) and the held-out domains; mean and standard error over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
RESULTS = REPO / "benchmarks" / "results" / "dwm.md"


def prepared(data: Path | None = None) -> Path:
    """The shipped corpus, prepared as `dwm demo` does (skipped when already done)."""
    from dwm.data.prepare import PrepareOptions, prepare

    data = data or OUT / "data"
    prepare([REPO / "data" / "corpus"], data, PrepareOptions(vocab_size=8192, seq_len=256))
    return data


def run_once(name: str, data: Path, out: Path, steps: int, seed: int, extra: list[str]) -> tuple[float, Path]:
    import shutil

    from dwm.run import build_trainer, load_config, recipe_path

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(recipe_path(f"cpu-small-{name}"), [
        f"data.dir={data}", f"out={out}", f"train.max_steps={steps}", f"train.seed={seed}",
        "train.global_batch_tokens=4096", f"optim.warmup_steps={max(1, steps // 10)}", f"weighting.reference={REPO / 'data/target/reference.jsonl'}",
        "log.progress=false", f"checkpoint.every={steps}", *extra])
    trainer = build_trainer(cfg)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, out


def probe_seconds(run: Path) -> float:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return sum(r.get("probe_seconds", 0.0) for r in recs if r.get("event") == "stage")


def ms(xs: list[float]) -> str:
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return f"{m:.4f} ± {se:.4f}"


def bench(args) -> str:
    from dwm.eval.cli import evaluate_run

    data = prepared(args.data)
    rows: dict[str, list[dict]] = {"uniform": [], "dwm": []}
    ratios, n_updates = [], 0
    for seed in args.seeds:
        secs = {}
        for name in ("uniform", "dwm"):
            sec, run = run_once(name, data, OUT / f"{name}-s{seed}", args.steps, seed, args.extra)
            probe = probe_seconds(run) if name == "dwm" else 0.0
            secs[name] = sec - probe
            if name == "dwm":
                n_updates = sum(1 for x in (run / "metrics.jsonl").read_text().splitlines() if '"bilevel"' in x)
            res = evaluate_run(run, target=REPO / "data/target/heldout.jsonl", max_passages=args.max_passages)
            lam = res["lambada"]
            rows[name].append({"lambada_passage_loss": lam["passage_loss"],
                               "lambada_target_nll": math.log(lam["perplexity"]), "lambada_acc": lam["acc"],
                               "heldout_loss": res["heldout"]["overall"]["loss"], "train_seconds": secs[name],
                               "probe_seconds": probe})
            print(f"  seed {seed} {name}: {rows[name][-1]}", file=sys.stderr, flush=True)
        ratios.append(secs["dwm"] / secs["uniform"])
    tok = args.steps * 4096
    lines = [
        (f"## cpu-small, {args.steps} steps x 4096 tokens, seeds {args.seeds}, default DWM schedule "
         f"({n_updates} bi-level updates in 5 stages), heldout target split ({args.max_passages} passages)"), "",
        "| metric | uniform | DWM |", "|---|---|---|",
        (f"| tokens/s (mean ± se) | {ms([tok / r['train_seconds'] for r in rows['uniform']])} | "
         f"{ms([tok / r['train_seconds'] for r in rows['dwm']])} |")]
    for key in ("lambada_passage_loss", "lambada_target_nll", "lambada_acc", "heldout_loss"):
        lines.append(f"| {key} | {ms([r[key] for r in rows['uniform']])} | {ms([r[key] for r in rows['dwm']])} |")
    lines += ["", (f"**amortised overhead, DWM time / uniform time per seed: {[round(r, 3) for r in ratios]}, "
                   f"median {statistics.median(ratios):.3f}** (goal <= 1.15); probe scoring excluded: "
                   f"{statistics.fmean([r['probe_seconds'] for r in rows['dwm']]):.1f} s per run"), "",
              "per seed: " + json.dumps(rows), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--data", type=Path, default=None, help="prepared shipped corpus (default: prepare it here)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-passages", type=int, default=500)
    p.add_argument("--extra", nargs="*", default=[], help="config overrides for both runs")
    args = p.parse_args()
    text = bench(args)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(f"\n<!-- {time.strftime('%Y-%m-%d %H:%M')} {' '.join(sys.argv[1:])} -->\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
