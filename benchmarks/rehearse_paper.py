"""Rehearse the paper-370m geometry on the CPU and put the measured peak memory next to `dwm plan`'s prediction.

The run: `dwm train` of the paper-370m recipe with 2048-token samples, micro-batch 1, a global batch of 2 samples,
3 steps in fp32 on the CPU, with one bi-level update (weighting.mode = dwm, 1 stage, 1 update at step 0) that
probes 8 samples against 2 reference passages. No checkpoint is written (the trainer's save is skipped: a 370M
model and its AdamW state are 4.5 GB of disk); the probe set's LM-loss pass is off (probe_size 8).

Measured: the peak RSS (VmHWM) of this process minus its RSS just before the trainer is built, (a) up to the end of
the bi-level update (the model, its optimizer and the update: logged as its `bilevel` event) and (b) over the
3 training steps after it (VmHWM is reset at the event through /proc/self/clear_refs). Predicted: dwm.plan's
report for the same config on the CPU (simulated tensor peak + the calibrated CPU heap overhead).

It needs a prepared data dir at seq_len 2048, made from the shipped corpus (the paper's 32k vocabulary):

    dwm prepare data/corpus --out runs/rehearsal/data --seq-len 2048 --vocab-size 32000
    PYTHONPATH=src python benchmarks/rehearse_paper.py --data runs/rehearsal/data [--model cpu-small]

`--model cpu-small` runs the same geometry with the small model (a quick end-to-end check of the script).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from benchlib import git_commit  # benchmarks/ is sys.path[0] when a script runs

MIB = 1024 ** 2


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024.0
    return float("nan")


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"data.dir={args.data}", f"out={args.out}", f"model.spec={args.model}",
            f"train.global_batch_tokens={2 * args.seq}", "train.micro_batch_size=1", "train.max_tokens=0",
            f"train.max_steps={args.steps}",
            "train.precision=fp32", "train.device=cpu", "train.compile=false", "optim.warmup_steps=1",
            "checkpoint.every=0", "log.every=1", "log.progress=false",
            "weighting.mode=dwm", "weighting.schedule=staged", "weighting.stages=1", "weighting.advanced.updates_per_stage=1",
            f"weighting.advanced.batch_size={args.probe}", f"weighting.advanced.ref_batch_size={args.ref}",
            "weighting.probe_size=8", "weighting.advanced.probe_lm_loss=false", f"weighting.reference={args.reference}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="prepared dir at seq_len 2048")
    ap.add_argument("--model", default="paper-370m")
    ap.add_argument("--out", default="runs/rehearsal/run")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--probe", type=int, default=8, help="samples the bi-level update probes")
    ap.add_argument("--ref", type=int, default=2, help="reference passages of the bi-level update")
    ap.add_argument("--reference", default="data/target/reference.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plan-only", action="store_true", help="print dwm plan's prediction only, do not train")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dwm.data.dataset import read_meta
    from dwm.plan import format_report, make_report
    from dwm.run import build_trainer, load_config
    from dwm.train.callbacks import Callback

    args.seq = int(read_meta(args.data)["seq_len"])
    cfg = load_config(Path(__file__).resolve().parents[1] / "src/dwm/recipes/paper-370m-dwm.toml", overrides(args))
    rep = make_report(cfg, gpus=1, gpu_memory_gib=1e9, mfu=0.4, peak_tflops=989)
    print(format_report(rep), flush=True)
    if args.plan_only:
        return

    marks: dict[str, float] = {}

    class Mark(Callback):
        def on_log(self, ctx, record):
            if record.get("event") == "bilevel":
                marks["update_hwm"] = _status("VmHWM")
                marks["update_s"] = time.perf_counter() - marks["t0"]
                marks["reset"] = float(_reset_hwm())

    base = _status("VmRSS")
    marks["t0"] = time.perf_counter()
    tr = build_trainer(cfg, callbacks=[Mark()])
    tr.save = lambda: None  # type: ignore[method-assign]
    tr.train()
    total_s = time.perf_counter() - marks["t0"]
    end_hwm = _status("VmHWM")
    mem = rep["mem"]
    res = {
        "model": args.model, "seq_len": args.seq, "vocab": rep["plan"].vocab_size, "params": rep["shape"].n_params,
        "threads": args.threads, "seconds": round(total_s, 1), "update_seconds": round(marks.get("update_s", 0), 1),
        "predicted_step_mib": round(mem.step_peak / MIB), "predicted_update_mib": round(mem.update_peak / MIB),
        "measured_update_mib": round((marks.get("update_hwm", float("nan")) - base) / MIB),
        "measured_steps_mib": round((end_hwm - base) / MIB) if marks.get("reset") else None,
        "rss_base_mib": round(base / MIB),
        "commit": git_commit(),
    }
    print("\n| phase | predicted peak (simulated + CPU heap) | measured peak (RSS over pre-trainer RSS) | "
          "predicted / measured |")
    print("|---|---|---|---|")
    for ph, p, m in (("bi-level update (incl. the model and optimizer)", res["predicted_update_mib"],
                      res["measured_update_mib"]),
                     ("training steps after it", res["predicted_step_mib"], res["measured_steps_mib"])):
        ratio = f"{p / m:.3f}" if m else "n/a"
        print(f"| {ph} | {p:,} MiB | {m if m is None else f'{m:,}'} MiB | {ratio} |")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
