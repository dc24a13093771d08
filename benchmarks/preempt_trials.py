"""Preemption trials (prints a table; not a test): `dwm train` in a real process gets SIGTERM at a random moment
(a random delay after its first logged step), must exit 75 after checkpointing, and `--resume` must end with
weights bit-identical to an uninterrupted run's. Counts the trials that pass.

    .venv/bin/python benchmarks/preempt_trials.py [--trials 5] [--steps 100] [--seed 0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    from dwm.testing import make_synthetic_prepared

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dwm-preempt-"))
    work.mkdir(parents=True, exist_ok=True)
    data = make_synthetic_prepared(work / "data")
    common = [f"data.dir={data}", "model.spec=tiny", "train.global_batch_tokens=256", "train.micro_batch_size=4",
              f"train.max_steps={args.steps}", "checkpoint.every=15", "log.every=1", "log.progress=false",
              "train.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dwm = [sys.executable, "-m", "dwm", "train"]
    subprocess.run([*dwm, "--out", str(work / "ref"), *common], env=env, check=True, capture_output=True)
    final = f"step_{args.steps:08d}"
    ref = load_file(str(work / "ref" / "checkpoints" / final / "model" / "model.safetensors"))
    rng = random.Random(args.seed)
    rows, passed = [], 0
    for t in range(args.trials):
        run = work / f"t{t}"
        shutil.rmtree(run, ignore_errors=True)
        proc = subprocess.Popen([*dwm, "--out", str(run), *common], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:
            m = run / "metrics.jsonl"
            if m.is_file() and m.read_text().count("\n") >= 1:
                break
            time.sleep(0.02)
        delay = rng.uniform(0.0, 1.5)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate()
        stopped = (run / "checkpoints" / "LATEST").read_text().strip() if (run / "checkpoints" / "LATEST").is_file() \
            else "-"
        r = subprocess.run([*dwm, "--out", str(run), "--resume"], env=env, capture_output=True, text=True, check=False)
        got = run / "checkpoints" / final / "model" / "model.safetensors"
        same = r.returncode == 0 and got.is_file() and all(
            torch.equal(v, load_file(str(got))[k]) for k, v in ref.items())
        ok = proc.returncode == 75 and same
        passed += ok
        rows.append((t, f"{delay:.2f}", proc.returncode, stopped, r.returncode, same))
        if not ok:
            print(err[-1500:], r.stderr[-1500:], file=sys.stderr)
    print(f"- {args.trials} trials, tiny model, {args.steps} steps, checkpoint.every 15, SIGTERM a random 0-1.5 s "
          "after the first logged step; measured (real processes)")
    print()
    print("| trial | delay s | rc after SIGTERM | checkpoint at stop | rc of --resume | final weights = reference |")
    print("|---:|---:|---:|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    print()
    print(f"passed: {passed}/{args.trials}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
