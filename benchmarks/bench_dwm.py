"""DWM benchmarks on the shipped corpus (prints figures; not a test).

    python benchmarks/bench_dwm.py overhead [--steps 250]     # whole-run tokens/s, DWM vs uniform, same config
    python benchmarks/bench_dwm.py quality  [--seeds 0 1 2]   # heldout LAMBADA-style loss/acc, DWM vs uniform

`overhead`: the same cpu-small run (data, order, budget) with uniform weights and with the default DWM schedule
(weighting forward on every batch + M bi-level updates at each of 5 stage starts), timed back to back, twice,
alternating. The ratio is uniform tokens/s over DWM tokens/s (goal <= 1.15). Probe scoring at stage boundaries is
timed separately (it is analysis output, not part of the method).

`quality`: for each seed, a uniform and a DWM run on the same token budget, evaluated on the `heldout` target
split (never seen by the weighting model) and the held-out domains; mean and standard error over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
RESULTS = REPO / "benchmarks" / "results" / "dwm.md"


def prepared() -> Path:
    from dwm.data.prepare import PrepareOptions, prepare

    data = OUT / "data"
    prepare([REPO / "data" / "corpus"], data, PrepareOptions(vocab_size=8192, seq_len=256))
    return data


def run_once(name: str, data: Path, out: Path, steps: int, seed: int, extra: list[str]) -> tuple[float, Path]:
    import shutil

    from dwm.train.config import load_config, recipe_path
    from dwm.train.trainer import Trainer

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(recipe_path(f"cpu-small-{name}"), [
        f"data.dir={data}", f"out={out}", f"train.max_steps={steps}", f"train.seed={seed}",
        "train.global_batch_tokens=4096", f"weighting.reference={REPO / 'data/target/reference.jsonl'}",
        "log.progress=false", f"checkpoint.every={steps}", *extra])
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, out


def probe_seconds(run: Path) -> float:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return sum(r.get("probe_seconds", 0.0) for r in recs if r.get("event") == "stage")


def overhead(args) -> str:
    data = prepared()
    times: dict[str, list[float]] = {"uniform": [], "dwm": []}
    probes = []
    for rep in range(args.repeats):
        for name in ("uniform", "dwm"):
            sec, run = run_once(name, data, OUT / f"overhead-{name}", args.steps, 0, args.extra)
            if name == "dwm":
                p = probe_seconds(run)
                probes.append(p)
                sec -= p
            times[name].append(sec)
            print(f"  rep {rep} {name}: {sec:.1f} s", file=sys.stderr)
    tok = args.steps * 4096
    u, d = statistics.median(times["uniform"]), statistics.median(times["dwm"])
    recs = [json.loads(x) for x in (OUT / "overhead-dwm" / "metrics.jsonl").read_text().splitlines()]
    n_updates = sum(1 for r in recs if r.get("event") == "bilevel")
    lines = [
        (f"## Amortised overhead (cpu-small, {args.steps} steps x 4096 tokens, default schedule: "
         f"{n_updates} bi-level updates in 5 stages), median of {args.repeats}"),
        "", "| run | seconds | tokens/s |", "|---|---|---|",
        f"| uniform | {u:.1f} | {tok / u:.0f} |", f"| DWM (fd) | {d:.1f} | {tok / d:.0f} |",
        "", (f"**ratio uniform tokens/s / DWM tokens/s = {d / u:.3f}** (goal <= 1.15); probe scoring at stage "
             f"boundaries, excluded above: {statistics.median(probes):.1f} s"), ""]
    return "\n".join(lines)


def quality(args) -> str:
    from dwm.eval.cli import evaluate_run

    data = prepared()
    rows: dict[str, list[dict]] = {"uniform": [], "dwm": []}
    for seed in args.seeds:
        for name in ("uniform", "dwm"):
            _, run = run_once(name, data, OUT / f"quality-{name}-s{seed}", args.steps, seed, args.extra)
            res = evaluate_run(run, target=REPO / "data/target/heldout.jsonl", max_passages=args.max_passages)
            lam = res["lambada"]
            rows[name].append({"lambada_loss": math.log(lam["perplexity"]), "lambada_acc": lam["acc"],
                               "heldout_loss": res["heldout"]["overall"]["loss"]})
            print(f"  seed {seed} {name}: {rows[name][-1]}", file=sys.stderr)

    def ms(xs):
        m = statistics.fmean(xs)
        se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
        return f"{m:.4f} ± {se:.4f}"

    lines = [(f"## Quality (cpu-small, {args.steps} steps x 4096 tokens, seeds {args.seeds}; heldout target split, "
              f"{args.max_passages} passages; mean ± standard error)"), "",
             "| metric | uniform | DWM |", "|---|---|---|"]
    for key in ("lambada_loss", "lambada_acc", "heldout_loss"):
        lines.append(f"| {key} | {ms([r[key] for r in rows['uniform']])} | {ms([r[key] for r in rows['dwm']])} |")
    lines.append("")
    lines.append("per seed: " + json.dumps(rows))
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["overhead", "quality"])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-passages", type=int, default=500)
    p.add_argument("--extra", nargs="*", default=[], help="config overrides for both runs")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    text = overhead(args) if args.what == "overhead" else quality(args)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(f"\n<!-- {time.strftime('%Y-%m-%d %H:%M')} {' '.join(sys.argv[1:])} -->\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
