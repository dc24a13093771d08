"""Benchmark the Trainer against a minimal hand-written PyTorch loop (prints a table; not a test).

Same model (cpu-small, same init), same data rows, same batch (8 x 256 tokens), same optimizer, schedule and clip,
in the same process, interleaved repeats (trainer, loop, trainer, loop, ...) so that machine load hits both alike;
the reported tokens/s is the median over repeats. The Trainer is timed through its real `train()` loop
(weighter call, weighted per-sample loss, metrics every 10 steps) with checkpoint writing switched off, since
checkpoint I/O is not step throughput. Goal: trainer/loop >= 0.95 without compile.
Then the torch.compile gain (Trainer with train.compile=true vs without, after warm-up), and the peak memory of
both: peak RSS (VmHWM) of a child process running each for a few steps on CPU, max_memory_allocated on CUDA.

The data is a synthetic prepared dir (dwm.testing) whose rows are overwritten with uniform random ids of an
8192-token vocabulary, so the embedding/LM head have cpu-small's intended size.

    .venv/bin/python benchmarks/bench_train.py [--steps 4] [--repeats 5] [--threads N] [--no-compile]

On a shared, busy machine wall-clock ratios swing by 2x between repeats; the CPU-time ratio and the median of
paired (back-to-back) ratios are the figures to read there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from dwm.data.dataset import PreparedData
from dwm.run import load_config
from dwm.testing import make_synthetic_prepared
from dwm.train.model import build_model, count_params
from dwm.train.trainer import Trainer, lr_factor

SEQ, BATCH, VOCAB = 256, 8, 8192


def make_data(root: Path, n: int) -> Path:
    d = make_synthetic_prepared(root / "data", n_train=n, n_val=8, seq_len=SEQ, seed=0)
    meta = json.loads((d / "meta.json").read_text())
    rng = np.random.default_rng(0)
    rows = np.memmap(d / "train.bin", dtype=meta["dtype"], mode="r+", shape=(n, SEQ))
    rows[:] = rng.integers(2, VOCAB, size=(n, SEQ))
    rows.flush()
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(d / "train.parquet")
    t = t.set_column(t.column_names.index("n_tokens"), "n_tokens", pa.array(np.full(n, SEQ, np.int32)))
    pq.write_table(t, d / "train.parquet")
    meta["vocab_size"] = VOCAB
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def trainer_cfg(data: Path, out: Path, total: int, device: str, compile_: bool = False):
    return load_config(None, [f"data.dir={data}", f"out={out}", "model.spec=cpu-small",
                              f"train.global_batch_tokens={SEQ * BATCH}", f"train.micro_batch_size={BATCH}",
                              f"train.max_steps={total}", "log.every=10", "log.progress=false",
                              "checkpoint.every=0", f"train.device={device}", f"train.compile={str(compile_).lower()}",
                              "optim.warmup_steps=10"])


class HandLoop:
    """What one would write by hand: HF loss, AdamW (decay on matrices), warmup+cosine, clip 1.0."""

    def __init__(self, data: PreparedData, total: int, device: torch.device):
        self.data, self.device = data, device
        self.model = build_model("cpu-small", data.vocab_size, seed=0, max_seq_len=SEQ).to(device)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        other = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                     lr=5e-4, betas=(0.9, 0.95), eps=1e-8)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, 10, total, 0.1))
        self.step = 0
        self.bf16 = device.type == "cuda"

    def run(self, k: int) -> None:
        for _ in range(k):
            idx = np.arange(self.step * BATCH, (self.step + 1) * BATCH) % len(self.data)
            x = torch.from_numpy(np.asarray(self.data.tokens[idx], dtype=np.int64)).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.model(input_ids=x, labels=x).loss
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def run_trainer(tr: Trainer, k: int) -> None:
    tr.total_steps = tr.step + k
    tr.train()
    if tr.device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, k: int, cpu: list[float] | None = None) -> float:
    """tokens per wall second; appends tokens per CPU second of this process to `cpu` (robust to a busy host)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(k)
    if cpu is not None:
        cpu.append(k * BATCH * SEQ / (time.process_time() - c0))
    return k * BATCH * SEQ / (time.perf_counter() - t0)


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(which: str, data: Path, out: Path, device: str) -> None:
    """Run one variant for 3 steps; print peak memory as JSON (a fresh process so peaks don't mix)."""
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    if which == "trainer":
        tr = Trainer(trainer_cfg(data, out, 100, device))
        tr.save = lambda: None  # type: ignore[method-assign]
        base = vm_rss_mb()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run_trainer(tr, 3)
    else:
        loop = HandLoop(PreparedData(data, "train"), 100, dev)
        base = vm_rss_mb()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        loop.run(3)
    res = {"rss_base_mb": base, "rss_peak_mb": vm_hwm_mb()}
    if dev.type == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))


def memory(which: str, data: Path, root: Path, device: str) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--memory-child", which, "--data", str(data), "--run", str(root / f"mem_{which}"),
           "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.md"))
    ap.add_argument("--memory-child", choices=["trainer", "hand"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, Path(args.data), Path(args.run), args.device)
        return
    dev = torch.device(args.device)
    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    total = args.steps * (args.repeats + 1) + 10
    data = make_data(root, BATCH * total)
    tr = Trainer(trainer_cfg(data, root / "run", 10**6, args.device))
    tr.save = lambda: None  # type: ignore[method-assign]  # checkpoint I/O is not step throughput
    loop = HandLoop(PreparedData(data, "train"), 10**6, dev)
    assert all(torch.equal(a, b) for a, b in zip(tr.model.parameters(), loop.model.parameters(), strict=True))
    run_trainer(tr, 1)  # warm-up both
    loop.run(1)
    t_tr, t_hand, c_tr, c_hand = [], [], [], []
    for _ in range(args.repeats):
        t_tr.append(timed(lambda k: run_trainer(tr, k), args.steps, c_tr))
        t_hand.append(timed(loop.run, args.steps, c_hand))
    med_tr, med_hand = statistics.median(t_tr), statistics.median(t_hand)
    rows = [("params", f"{count_params(tr.model) / 1e6:.2f}M"),
            ("trainer tokens/s (median)", f"{med_tr:,.0f}"),
            ("hand loop tokens/s (median)", f"{med_hand:,.0f}"),
            ("ratio of medians trainer / hand loop", f"{med_tr / med_hand:.3f}  (goal >= 0.95)"),
            ("median of paired ratios", f"{statistics.median(a / b for a, b in zip(t_tr, t_hand, strict=True)):.3f}"),
            ("CPU-time ratio (tokens per CPU-second, medians)",
             (f"{statistics.median(c_tr) / statistics.median(c_hand):.3f}  "
             f"({statistics.median(c_tr):,.0f} vs {statistics.median(c_hand):,.0f})")),
            ("per-repeat ratios", ", ".join(f"{a / b:.2f}" for a, b in zip(t_tr, t_hand, strict=True)))]
    if not args.no_compile:
        try:
            trc = Trainer(trainer_cfg(data, root / "run_c", 10**6, args.device, compile_=True))
            trc.save = lambda: None  # type: ignore[method-assign]
            t0 = time.perf_counter()
            run_trainer(trc, 2)  # compile + warm-up
            compile_s = time.perf_counter() - t0
            t_c, t_e = [], []
            for _ in range(max(2, args.repeats // 2)):
                t_c.append(timed(lambda k: run_trainer(trc, k), args.steps))
                t_e.append(timed(lambda k: run_trainer(tr, k), args.steps))
            gain = statistics.median(t_c) / statistics.median(t_e)
            rows += [("trainer + torch.compile tokens/s", f"{statistics.median(t_c):,.0f}"),
                     ("torch.compile gain (compiled / eager)", f"{gain:.3f}  (compile + 2 warm-up steps: {compile_s:.0f} s)")]
        except Exception as e:  # noqa: BLE001 - no compiler toolchain etc.: report, don't fail the benchmark
            rows.append(("torch.compile", f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
    for which in ("trainer", "hand"):
        m = memory(which, data, root, args.device)
        val = f"{m['rss_peak_mb']:,.0f} MB peak RSS ({m['rss_peak_mb'] - m['rss_base_mb']:,.0f} MB over pre-step RSS)"
        if "cuda_peak_mb" in m:
            val += f"; CUDA peak allocated {m['cuda_peak_mb']:,.0f} MB"
        rows.append((f"peak memory, {which}", val))
    header = (f"bench_train: cpu-small, seq {SEQ}, batch {BATCH}, device {args.device}, {args.repeats} interleaved "
              f"repeats x {args.steps} steps, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}")
    w = max(len(k) for k, _ in rows)
    table = "\n".join([header, "", f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|",
                       *[f"| {k.ljust(w)} | {v} |" for k, v in rows]])
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("# Trainer benchmark\n\n```\n.venv/bin/python benchmarks/bench_train.py "
                              + " ".join(sys.argv[1:]) + "\n```\n\n"
                              + table + "\n")


if __name__ == "__main__":
    main()
