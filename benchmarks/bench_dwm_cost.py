"""Where a DWM run's cost over uniform training goes (prints figures; not a test).

    .venv/bin/python benchmarks/bench_dwm_cost.py [--steps 30] [--preset cpu-small] [weighting.KEY=VALUE ...]

One process, one torch thread, the benchmark's target and batch (novels, 4096 tokens a step): after an untimed
2-step warm-up, `--steps` steps of the uniform recipe, then the same steps of the cpu-small-dwm recipe (with any
overrides) in 2 stages, so 2 bi-level updates. Each DWM component is timed by wrapping its method (wall and process
CPU time; on a shared machine CPU time is the load-robust figure): phi scoring the candidates of every step, the
bi-level update and, inside it, the LM side (`hypergradient`: the weighted lookahead, the reference gradient, the
two perturbed forwards, also timed alone: the fd hypergradient's cost per probed sample) and phi's steps (forward;
their backward is the remainder), and the probe pass at each stage (excluded from the cost, as in bench_dwm.py). The
per-step and per-update figures are then extrapolated to the benchmark's run (150 steps, 5 stages): predicted DWM /
uniform = 1 + (5 x update + 150 x (scoring + other per step)) / (150 x uniform step). bench_dwm.py's side-by-side
whole-run ratio is the measurement; this says which part to cut.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dwm  # the benchmark's targets and run configuration

RUN_STEPS, RUN_STAGES = 150, 5


def timed_train(cfg, wraps: dict[str, tuple[object, str]]) -> tuple[float, float, dict, collections.Counter]:
    """Train `cfg`; (wall s, CPU s, {tag: [wall, cpu]}, calls) with each (owner, method) of `wraps` timed."""
    from dwm.run import build_trainer

    spent: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    calls: collections.Counter = collections.Counter()
    saved = []
    for tag, (owner, name) in wraps.items():
        f = getattr(owner, name)
        saved.append((owner, name, f))

        def timed(*a, _f=f, _tag=tag, **k):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return _f(*a, **k)
            finally:
                spent[_tag][0] += time.perf_counter() - w0
                spent[_tag][1] += time.process_time() - c0
                calls[_tag] += 1

        setattr(owner, name, timed)
    try:
        trainer = build_trainer(cfg)
        w0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        return time.perf_counter() - w0, time.process_time() - c0, dict(spent), calls
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="LM steps of each arm (2 stages: updates at 0 and steps/2)")
    p.add_argument("--preset", default="cpu-small", help="model preset")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=bench_dwm.REPO / "benchmarks" / "out" / "dwm",
                   help="bench_dwm.py's cache, for its prepared data")
    p.add_argument("overrides", nargs="*", help="weighting.KEY=VALUE changes of the DWM arm")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be >= 2 (two stages)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from dwm.nn import bilevel
    from dwm.weighting import dwm_weighter as dw
    from dwm.weighting import learner, outputs, probe, resample

    torch.set_num_threads(args.threads)
    target = bench_dwm.prepare_targets(args.out)["novels"]
    budget = bench_dwm.Budget(args.steps, 4096, args.preset)
    wraps = {"score candidates (every step)": (resample.ResampleSelector, "score"),
             "bi-level update": (dw.DWMWeighter, "_update"),
             "  LM side (hypergradient)": (probe, "hypergradient"),
             "    its perturbed forwards (2 per update)": (bilevel.Passes, "sample_losses"),
             "  phi's steps (forward + backward)": (learner.PhiLearner, "phi_backward"),
             "probe pass (excluded)": (outputs.StageWriter, "save_stage")}
    with tempfile.TemporaryDirectory() as tmp:
        cell = bench_dwm.Cell("novels", "uniform", 0)
        # warm-up, untimed: the first run in a process pays one-time costs (lazy imports, allocator growth)
        timed_train(bench_dwm.cell_config(cell, target, Path(tmp) / "warmup", bench_dwm.Budget(2, 4096, args.preset)), {})
        u_wall, u_cpu, _, _ = timed_train(bench_dwm.cell_config(cell, target, Path(tmp), budget), {})
        cell = bench_dwm.Cell("novels", "ablation:cost", 0, ["weighting.stages=2", *args.overrides])
        d_wall, d_cpu, spent, calls = timed_train(bench_dwm.cell_config(cell, target, Path(tmp), budget), wraps)
        log = (Path(tmp) / cell.key / "metrics.jsonl").read_text().splitlines()
        probed = max(json.loads(x).get("probed", 0) for x in log)  # samples probed by one update
    n = args.steps
    step = (u_wall / n, u_cpu / n)
    print(f"{args.preset}, {n} steps x 4096 tokens, {args.threads} thread(s); DWM overrides: {args.overrides or 'none'}")
    print(f"uniform: {u_wall:.1f} s wall, {u_cpu:.1f} s CPU ({step[0]:.3f} / {step[1]:.3f} s a step)")
    print(f"DWM:     {d_wall:.1f} s wall, {d_cpu:.1f} s CPU\n")
    print("| component | calls | wall s | CPU s | per call (CPU s) | per call / uniform step |")
    print("|---|---|---|---|---|---|")
    for tag in wraps:
        w, c = spent.get(tag, (0.0, 0.0))
        k = max(1, calls[tag])
        print(f"| {tag} | {calls[tag]} | {w:.2f} | {c:.2f} | {c / k:.3f} | {c / k / step[1]:.2f} |")
    # what is left of DWM's time over uniform's once the timed parts are taken out: per-step bookkeeping
    other = [(d - u - spent["score candidates (every step)"][i] - spent["bi-level update"][i]
              - spent["probe pass (excluded)"][i]) / n for i, (d, u) in enumerate(((d_wall, u_wall), (d_cpu, u_cpu)))]
    print(f"| other (per step: weight stats, selection; can be < 0 from noise) | {n} | {other[0] * n:.2f} | "
          f"{other[1] * n:.2f} | {other[1]:.3f} | {other[1] / step[1]:.2f} |")
    upd = spent["bi-level update"][1] / max(1, calls["bi-level update"])
    score = spent["score candidates (every step)"][1] / max(1, calls["score candidates (every step)"])
    extra = RUN_STAGES * upd + RUN_STEPS * (score + other[1])
    base = RUN_STEPS * step[1]
    fwd = spent["    its perturbed forwards (2 per update)"][1] / max(1, calls["bi-level update"])
    print(f"\nthe perturbed forwards: {fwd / step[1]:.2f} uniform steps an update, "
          f"{fwd / step[1] / probed:.4f} a probed sample ({probed} an update; the fd hypergradient's floor: "
          f"two no-grad forwards of each probed sample)")
    print(f"\npredicted whole run ({RUN_STEPS} steps, {RUN_STAGES} stages; CPU time): DWM / uniform = "
          f"{1 + extra / base:.3f}; of the overhead {RUN_STAGES * upd / extra:.0%} bi-level updates, "
          f"{RUN_STEPS * score / extra:.0%} scoring candidates, {RUN_STEPS * other[1] / extra:.0%} other")
    return 0


if __name__ == "__main__":
    sys.exit(main())
