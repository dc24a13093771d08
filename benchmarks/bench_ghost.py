"""Cost of ghost hypergradients: a training step that scores every sample against a plain training step.

    .venv/bin/python benchmarks/bench_ghost.py                     # cpu-base, 16 x 256 tokens, one micro-batch
    .venv/bin/python benchmarks/bench_ghost.py --preset tiny --repeats 2   # quick smoke run

Modes (same model, AdamW state and batch): `plain` = forward + backward + AdamW step; `ghost` = the same with
dwm.nn.ghost hooks reading every sample's < P grad L_ref, grad l_i > out of the backward; `refresh` = one
reference direction (M = P grad L_ref over the reference batch), paid once every `ref_every` steps. Time: median of
interleaved repeats in one process, process CPU time (the load-robust figure on a shared machine) and wall.
Memory: each mode in its own process, peak RSS (VmHWM after a reset) minus the RSS before the step.
Goals: ghost CPU time <= 1.3x plain, memory <= 1.2x plain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_bilevel import setup
from bench_update_memory import reset_peak, rss_mb
from benchlib import git_commit

from dwm.nn.ghost import GhostScores, reference_direction
from dwm.train.losses import per_sample_nll

MODES = ("plain", "ghost", "refresh")


def step(mode, model, opt, data, ghost):
    ids, n, w, ref, mask = data
    if mode == "refresh":
        M, _ = reference_direction(model, ref, mask, opt, chunk_size=len(ids))
        ghost.set_direction(M)
        return None
    with ghost.capture() if mode == "ghost" else torch.enable_grad():
        loss = (w * per_sample_nll(model(input_ids=ids).logits, ids, n)).sum() / len(w)
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ghost.collect(w / len(w)) if mode == "ghost" else None


def child(args) -> None:
    model, opt, data = setup(args)
    ghost = GhostScores(model)
    M, _ = reference_direction(model, data[3], data[4], opt)
    ghost.set_direction(M)
    del M
    before = reset_peak()
    step(args.measure_memory, model, opt, data, ghost)
    print(json.dumps({"before_mb": before, "own_mb": rss_mb("VmHWM") - before}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-base")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ref-batch", type=int, default=16)
    ap.add_argument("--ref-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="append the markdown section to this file")
    ap.add_argument("--measure-memory", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        child(args)
        return 0
    mem = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--measure-memory", mode, "--preset", args.preset, "--seq", str(args.seq),
               "--batch", str(args.batch), "--ref-batch", str(args.ref_batch), "--ref-len", str(args.ref_len),
               "--threads", str(args.threads)]
        mem[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"memory {mode}: {mem[mode]}", flush=True)
    model, opt, data = setup(args)
    ghost = GhostScores(model)
    step("refresh", model, opt, data, ghost)
    for mode in ("plain", "ghost"):  # warm-up
        step(mode, model, opt, data, ghost)
    wall = {m: [] for m in MODES}
    cpu = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in MODES:
            t0, c0 = time.perf_counter(), time.process_time()
            step(mode, model, opt, data, ghost)
            wall[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
        print(f"repeat {r}: " + ", ".join(f"{m} {cpu[m][-1]:.2f}s cpu" for m in MODES), flush=True)
    c = {m: statistics.median(v) for m, v in cpu.items()}
    wl = {m: statistics.median(v) for m, v in wall.items()}
    rows = [f"| {m} | {c[m]:.2f} | {c[m] / c['plain']:.2f} | {wl[m]:.2f} | {wl[m] / wl['plain']:.2f} | "
            f"{mem[m]['own_mb']:.0f} | {mem[m]['own_mb'] / mem['plain']['own_mb']:.2f} | "
            f"{mem[m]['before_mb'] + mem[m]['own_mb']:.0f} |" for m in MODES]
    t_ratio, m_ratio = c["ghost"] / c["plain"], mem["ghost"]["own_mb"] / mem["plain"]["own_mb"]
    tot = (mem["ghost"]["before_mb"] + mem["ghost"]["own_mb"]) / (mem["plain"]["before_mb"] + mem["plain"]["own_mb"])
    commit = git_commit()
    from datetime import date

    n_params = sum(p.numel() for p in model.parameters())
    text = "\n".join([
        f"## Ghost hypergradients: a training step that scores every sample ({args.preset})", "",
        (f"Measured on this CPU ({platform.machine()}, torch {torch.__version__}, {args.threads} thread, "
         f"{os.cpu_count()} CPUs, shared): {n_params / 1e6:.1f}M parameters, float32, batch {args.batch} x "
         f"{args.seq} tokens in one micro-batch, reference {args.ref_batch} x {args.ref_len}. Time: median of "
         f"{args.repeats} interleaved repeats; memory: own process per mode, peak RSS minus RSS before the step "
         "(model, AdamW state, data and M, the one parameter-sized direction ghost keeps)."), "",
        "| mode | CPU s | CPU / plain | wall s | wall / plain | step MB | step MB / plain | total MB |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        (f"Goals: ghost time <= 1.3x plain ({'met' if t_ratio <= 1.3 else 'NOT met'}: {t_ratio:.2f}); memory <= "
         f"1.2x ({'met' if m_ratio <= 1.2 else 'NOT met'}: {m_ratio:.2f} on the step's own memory, {tot:.2f} on "
         "the total). `refresh` is paid once every weighting.ref_every steps."), "",
        f"{date.today()}, commit {commit}: `.venv/bin/python benchmarks/bench_ghost.py {' '.join(sys.argv[1:])}`", ""])
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
