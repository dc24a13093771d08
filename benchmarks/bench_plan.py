"""`dwm plan`'s predicted peak memory of a training step against the measured one, per CPU preset.

Predicted (simulated): dwm.train.memory.trace_step_memory, the step traced under FakeTensorMode, fp32 on the CPU.
Measured: a fresh child process per preset runs the trainer's step (build_model, make_optimizer, the weighted
per-sample loss over `accum` micro-batches, clip, AdamW step; the glibc setting `dwm train` makes on CPU) on random
tokens for 3 steps; "measured peak" = the process's peak RSS (VmHWM) during the steps minus its RSS just before the
model is built (so weights, gradients, optimizer state, activations and allocator/kernel overheads all count).

    PYTHONPATH=src python benchmarks/bench_plan.py [--presets cpu-mini,cpu-small,cpu-base] [--threads 1]

Geometry per preset as its recipe runs it (vocab 8192, seq 256): micro-batch 8 (cpu-mini and cpu-small,
cpu-small-dwm) and 16 (cpu-base, cpu-base-dwm). The recipes accumulate 8 and 16 micro-batches a step; the bench
runs 2 a step (the peak of an accumulating step is reached in its second micro-batch, whose forward runs with the
first one's gradients alive, and repeats in every later one), which keeps it to a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

GEOMETRY = {  # preset: micro-batch as its recipe runs it (seq 256, vocab 8192)
    "cpu-mini": 8,
    "cpu-small": 8,
    "cpu-base": 16,
}
ACCUM = 2  # the recipes accumulate 8 (cpu-small) and 16 (cpu-base) micro-batches; the peak is reached by the 2nd
SEQ, VOCAB = 256, 8192


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024.0
    return float("nan")


def child(spec: str, micro: int, accum: int, steps: int) -> None:
    """Measure one preset in this (fresh) process; print JSON."""
    from dwm.host import keep_freed_memory
    from dwm.train.config import OptimConfig
    from dwm.train.losses import per_sample_nll
    from dwm.train.model import build_model, count_params
    from dwm.train.trainer import make_optimizer

    keep_freed_memory()  # as `dwm train` does on CPU
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (steps * micro * accum, SEQ), generator=g)
    n_tok = torch.full((micro,), SEQ)
    base = _status("VmRSS")
    model = build_model(spec, VOCAB, seed=0, max_seq_len=SEQ)
    model.train()
    opt = make_optimizer(model, OptimConfig())
    B = micro * accum
    t0 = time.perf_counter()
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        for i in range(accum):
            ids = data[(s * accum + i) * micro:(s * accum + i + 1) * micro]
            nll = per_sample_nll(model(input_ids=ids).logits, ids, n_tok)
            (torch.ones(micro) * nll).sum().div(B).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    print(json.dumps({"params": count_params(model), "rss_base": base, "rss_peak": _status("VmHWM"),
                      "seconds": time.perf_counter() - t0}))


def measure(spec: str, micro: int, accum: int, steps: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", spec, "--micro", str(micro), "--accum", str(accum),
           "--steps", str(steps), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(GEOMETRY))
    ap.add_argument("--held-out", default="cpu-small:16,cpu-base:8",
                    help="preset:micro_batch rows the CPU heap factor was not fitted on ('' = none)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="measuring processes per row (peak RSS varies)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.micro, args.accum, args.steps)
        return
    from dwm.train.memory import CPU_HEAP_OVERHEAD, plan_memory

    todo = [(s, GEOMETRY[s], "recipe") for s in args.presets.split(",")]
    todo += [(h.split(":")[0], int(h.split(":")[1]), "held out") for h in args.held_out.split(",") if h]
    rows = []
    for spec, micro, kind in todo:
        t0 = time.perf_counter()
        pred = plan_memory(spec, VOCAB, SEQ, micro, accum=ACCUM, precision="fp32", device_type="cpu")
        t_pred = time.perf_counter() - t0
        ms = [measure(spec, micro, ACCUM, args.steps, args.threads) for _ in range(args.repeats)]
        meas = [m["rss_peak"] - m["rss_base"] for m in ms]
        rows.append((spec, micro, kind, ms[0]["params"], pred, meas, t_pred))
    print(f"bench_plan: seq {SEQ}, vocab {VOCAB}, fp32 on CPU, {ACCUM} micro-batches a step, {args.steps} steps, "
          f"{args.repeats} measuring processes per row, torch {torch.__version__}, {platform.machine()}, "
          f"{args.threads} thread(s); CPU heap factor {CPU_HEAP_OVERHEAD} x activations\n")
    print("| preset | micro-batch | row | params | simulated tensor peak: weights / grads / optimizer / activations "
          "| + CPU heap (calibrated) | predicted peak | measured peak (each process) | predicted / measured (mean) "
          "| plan s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    mib = 1024 ** 2
    for spec, micro, kind, n, pred, meas, t in rows:
        s = pred.step
        parts = " / ".join(f"{v / mib:,.0f}" for v in (s.weights, s.grads, s.optimizer, s.activations))
        mean = sum(meas) / len(meas)
        print(f"| {spec} | {micro} | {kind} | {n / 1e6:.2f}M | {s.total / mib:,.0f} MiB ({parts}) | "
              f"{pred.heap / mib:,.0f} MiB | {pred.step_peak / mib:,.0f} MiB | "
              f"{', '.join(f'{m / mib:,.0f}' for m in meas)} MiB | {pred.step_peak / mean:.3f} | {t:.1f} |")


if __name__ == "__main__":
    main()
