"""Peak memory of one bi-level update against one plain training step, and as the probed samples grow.

    .venv/bin/python benchmarks/bench_update_memory.py                 # cpu-base-dwm, micro-batch 16
    .venv/bin/python benchmarks/bench_update_memory.py --preset cpu-mini --probes 16 64 --global-batch 32  # quick

Each phase runs in its own process, built by the real `dwm train` wiring (recipe cpu-base-dwm: 256 samples x 256
tokens a step, micro-batch 16) with the AdamW state filled in (as after some training) so that no phase pays for
its lazy allocation. Before the phase the process returns freed heap memory (malloc_trim) and resets its peak RSS
(/proc/self/clear_refs); the phase's peak is then VmHWM, and "own" is that peak minus the RSS just before it (model,
AdamW state, data: what every phase shares). Phases:
- plain: one training step (forward + backward of 16 micro-batches, clip, AdamW step);
- update N: one bi-level update of the DWM weighter probing N samples (weighting.advanced.batch_size = N): the lookahead's
  weighted pass over the first G of them, the reference pass, two perturbed forwards of all N, phi's steps;
- update N one-pass: the same with every pass over all samples at once (chunk = N), the memory before chunking.
Goals: peak(update 512) <= 1.10 x peak(update 64); peak(update) <= 1.3 x peak(plain).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from benchlib import git_commit  # benchmarks/ is sys.path[0] when a script runs

REPO = Path(__file__).resolve().parents[1]


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb("VmRSS")


def child(args) -> None:
    from dwm.nn.bilevel import PARAM_COPIES
    from dwm.run import build_trainer, load_config, recipe_path

    torch.set_num_threads(args.threads)
    kind, _, rest = args.phase.partition(":")
    n_probe = int(rest.split(":")[0]) if rest else 0
    ov = [f"data.dir={args.data}", f"out={args.run}", f"model.spec={args.preset}", "train.max_steps=50",
          f"train.micro_batch_size={args.micro}", f"train.global_batch_tokens={args.global_batch * 256}",
          f"weighting.reference={REPO / 'data/target/reference.jsonl'}", "log.progress=false",
          f"weighting.advanced.batch_size={max(n_probe, 1)}", "weighting.advanced.diagnostics=false"]
    cfg = load_config(recipe_path(args.recipe), ov)
    tr = build_trainer(cfg)
    g = torch.Generator().manual_seed(0)
    for p in tr.model.parameters():  # AdamW's state as after training (no lazy allocation inside a phase)
        tr.optimizer.state[p] = {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(p),
                                 "exp_avg_sq": torch.rand(p.shape, generator=g) * 1e-4}
    n_params = sum(p.numel() for p in tr.model.parameters())
    if kind == "plain":
        batch = tr.local_batch(0)
        before = reset_peak()
        tr.train_step(batch)
    else:
        w = tr.weighter
        if rest.endswith("one-pass"):
            w.scorer.micro = w.learner.probe.micro = n_probe  # every pass over all probed samples at once
        before = reset_peak()
        w._update(tr.ctx)
        assert w.n_updates == 1, "the update was skipped"
    peak = rss_mb("VmHWM")
    print(json.dumps({"phase": args.phase, "before_mb": before, "peak_mb": peak, "own_mb": peak - before,
                      "params": n_params, "param_mb": n_params * 4 / 2**20, "copies": PARAM_COPIES["fd"]}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="cpu-base-dwm")
    ap.add_argument("--preset", default="cpu-base")
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--global-batch", type=int, default=256, help="samples of 256 tokens a step")
    ap.add_argument("--probes", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--one-pass", type=int, nargs="*", default=[64], help="probe counts also run unchunked")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "out" / "update_memory"))
    ap.add_argument("--out", default="", help="append the markdown section to this file")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        child(args)
        return 0
    from dwm.data.prepare import PrepareOptions, prepare

    work = Path(args.work)
    data = work / "data"
    if not (data / "meta.json").is_file():
        prepare([REPO / "data" / "corpus"], data, PrepareOptions(vocab_size=8192, seq_len=256, progress=False))
    phases = ["plain", *[f"update:{n}" for n in args.probes], *[f"update:{n}:one-pass" for n in args.one_pass]]
    res = {}
    for ph in phases:
        with tempfile.TemporaryDirectory(dir=work) as run:
            cmd = [sys.executable, __file__, "--phase", ph, "--data", str(data), "--run", str(Path(run) / "r"),
                   "--recipe", args.recipe, "--preset", args.preset, "--micro", str(args.micro),
                   "--global-batch", str(args.global_batch), "--threads", str(args.threads)]
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if p.returncode != 0:
                res[ph] = {"phase": ph, "failed": (p.stderr.strip().splitlines() or ["killed"])[-1],
                           "rc": p.returncode}
            else:
                res[ph] = json.loads(p.stdout.strip().splitlines()[-1])
        print(json.dumps(res[ph]), flush=True)
    plain = res["plain"]
    lines = ["| phase | peak RSS MB | / plain | own MB (peak - before) | own / plain |", "|---|---|---|---|---|"]
    for ph in phases:
        r = res[ph]
        if "failed" in r:
            lines.append(f"| {ph} | failed (rc {r['rc']}: {r['failed'][:80]}) | | | |")
            continue
        lines.append(f"| {ph} | {r['peak_mb']:.0f} | {r['peak_mb'] / plain['peak_mb']:.2f} | {r['own_mb']:.0f} | "
                     f"{r['own_mb'] / plain['own_mb']:.2f} |")
    lo, hi = f"update:{min(args.probes)}", f"update:{max(args.probes)}"
    upd = [res[f"update:{n}"] for n in args.probes if "failed" not in res[f"update:{n}"]]
    growth = res[hi]["peak_mb"] / res[lo]["peak_mb"] if len(upd) == len(args.probes) else float("nan")
    worst = max(r["peak_mb"] for r in upd) / plain["peak_mb"] if upd else float("nan")
    commit = git_commit()
    cmd = " ".join([".venv/bin/python benchmarks/bench_update_memory.py", *sys.argv[1:]])
    text = "\n".join([
        f"## Peak memory of a bi-level update (recipe {args.recipe}, model {args.preset}, micro-batch {args.micro})",
        "",
        (f"Measured on this CPU ({platform.machine()}, torch {torch.__version__}, {args.threads} thread, "
         f"{os.cpu_count()} CPUs), {plain['params'] / 1e6:.1f}M parameters ({plain['param_mb']:.0f} MB each fp32 "
         f"copy), global batch {args.global_batch} x 256 tokens. Each phase in its own process; peak = VmHWM "
         "after a reset, before = RSS at the reset (model, AdamW state, data)."), "",
        *lines, "",
        (f"Goals: peak(update {max(args.probes)}) / peak(update {min(args.probes)}) = {growth:.3f} (goal <= 1.10: "
         f"{'met' if growth <= 1.10 else 'NOT met'}); worst update / plain step = {worst:.2f} (goal <= 1.3: "
         f"{'met' if worst <= 1.3 else 'NOT met'})."),
        (f"Parameter-sized copies the fd update holds beyond the training state: {plain['copies']} (saved theta, "
         f"the AdamW lookahead's P, one gradient buffer) = {plain['copies'] * plain['param_mb']:.0f} MB here."),
        "", f"{__import__('datetime').date.today()}, commit {commit}: `{cmd}`", ""])
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
