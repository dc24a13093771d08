"""Benchmark `train.keep_freed_memory` (dwm.host): the Trainer's CPU step with glibc keeping freed blocks in the
heap vs returning the large ones (a micro-batch's logits) to the kernel (prints a table; not a test).

mallopt is process-wide and cannot be undone, so each measurement is a child process: the two settings run side
by side (one child each, one torch thread each, so that machine load hits both alike), `--repeats` times, on the
same synthetic cpu-small data as bench_train.py (micro-batch 8 x 256 tokens of an 8192-token vocabulary,
`--accum` micro-batches a step: 2 = the demo's 4096-token steps). Figures per setting, medians over repeats: CPU
seconds per step (user + sys, robust to a busy host), sys seconds, minor page faults per step, wall seconds per
step; and the ratios off / on, per repeat and of the medians.

    .venv/bin/python benchmarks/bench_malloc.py [--steps 6] [--repeats 3] [--accum 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(data: str, out: str, steps: int, accum: int, keep: bool) -> None:
    """Train `steps` measured steps after one warm-up step; print one JSON line of per-step figures."""
    import torch
    from bench_train import BATCH, SEQ

    from dwm.run import load_config
    from dwm.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(None, [f"data.dir={data}", f"out={out}", "model.spec=cpu-small",
                             f"train.global_batch_tokens={SEQ * BATCH * accum}", f"train.micro_batch_size={BATCH}",
                             f"train.max_steps={steps + 1}", "log.progress=false", "checkpoint.every=0",
                             "train.device=cpu", f"train.keep_freed_memory={str(keep).lower()}"])
    tr = Trainer(cfg)
    tr.total_steps = 1
    tr.train()  # warm-up: first-touch allocations and lazy initialisation are not step cost
    tr.total_steps = steps + 1
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    tr.train()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    print(json.dumps({"cpu": (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / steps,
                      "sys": (r1.ru_stime - r0.ru_stime) / steps, "minflt": (r1.ru_minflt - r0.ru_minflt) / steps,
                      "wall": wall / steps}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="measured steps per child (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=3, help="side-by-side pairs")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches of 8 x 256 tokens per step")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    ap.add_argument("--child", nargs=3, metavar=("DATA", "OUT", "KEEP"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.steps, a.accum, a.child[2] == "on")
        return 0
    from bench_train import make_data

    res: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="bench_malloc_") as tmp:
        data = make_data(Path(tmp), 8 * a.accum * (a.steps + 1))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for r in range(a.repeats):
            procs = {k: subprocess.Popen([sys.executable, __file__, "--steps", str(a.steps), "--accum", str(a.accum),
                                          "--child", str(data), f"{tmp}/run_{k}_{r}", k],
                                         stdout=subprocess.PIPE, text=True, env=env) for k in ("off", "on")}
            for k, p in procs.items():
                out, _ = p.communicate()
                if p.returncode:
                    raise SystemExit(f"child {k} failed ({p.returncode})")
                res[k].append(json.loads(out.strip().splitlines()[-1]))
            print(f"[bench_malloc] repeat {r + 1}/{a.repeats}: CPU s/step off {res['off'][-1]['cpu']:.3f}, "
                  f"on {res['on'][-1]['cpu']:.3f}", file=sys.stderr, flush=True)

    def med(k: str, f: str) -> float:
        return statistics.median(x[f] for x in res[k])

    per = ", ".join(f"{o['cpu'] / n['cpu']:.3f}" for o, n in zip(res["off"], res["on"], strict=True))
    rows = [("CPU s/step (user + sys), median", f"{med('off', 'cpu'):.3f}", f"{med('on', 'cpu'):.3f}",
             f"{med('off', 'cpu') / med('on', 'cpu'):.3f}"),
            ("sys s/step, median", f"{med('off', 'sys'):.3f}", f"{med('on', 'sys'):.3f}", ""),
            ("minor page faults/step, median", f"{med('off', 'minflt'):,.0f}", f"{med('on', 'minflt'):,.0f}",
             f"{med('off', 'minflt') / max(1.0, med('on', 'minflt')):.1f}"),
            ("wall s/step, median (side by side)", f"{med('off', 'wall'):.3f}", f"{med('on', 'wall'):.3f}",
             f"{med('off', 'wall') / med('on', 'wall'):.3f}"),
            ("CPU-time ratio off / on per repeat", "", "", per)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    head = (f"bench_malloc: cpu-small, {a.accum} x 8 x 256 tokens a step, {a.steps} steps x {a.repeats} side-by-side "
            f"repeats, 1 thread each, torch {__import__('torch').__version__}, {platform.machine()}, "
            f"{platform.libc_ver()[0]} {platform.libc_ver()[1]}, load avg {load:.1f}")
    w = [max(len(r[i]) for r in [("metric", "keep off", "keep on", "off / on"), *rows]) for i in range(4)]
    lines = [head, "", "| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(("metric", "keep off", "keep on",
                                                                                 "off / on"))) + " |",
             "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    lines += ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
