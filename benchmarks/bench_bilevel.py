"""Cost of one bi-level hypergradient relative to one plain LM step (forward + backward + AdamW step).

    .venv/bin/python benchmarks/bench_bilevel.py            # cpu-base, seq 256, batch 8, ref batch 8
    .venv/bin/python benchmarks/bench_bilevel.py --preset tiny --repeats 2   # quick smoke run

Time: median over interleaved repeats (plain, fd, fd without the L_ref(theta) log forward, exact, plain, ...) in
one process, so machine load hits every mode alike; both wall time and process CPU time are recorded, with one
intra-op thread by default (--threads): on a shared machine CPU time is the load-robust figure.
Memory: every mode in its own subprocess; its peak RSS
(ru_maxrss) minus the RSS after setup (model + AdamW state + data, built without a step), so the figure is what the
step itself adds (activations, gradients, copies). Goals (docs/METHOD.md): fd time <= 3.0x, memory <= 1.5x.
Writes a markdown table to benchmarks/results/bilevel.md (or --out).
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
import time
from pathlib import Path

import torch

from dwm.nn.bilevel import adam_lookahead, adam_preconditioner, hypergradient
from dwm.nn.losses import per_sample_nll
from dwm.train.model import build_model, count_params

MODES = ("plain", "fd", "fd_nolog", "exact")
VOCAB = 8192


def setup(args):
    model = build_model(args.preset, VOCAB, attn_implementation="sdpa", seed=0, max_seq_len=args.seq)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():  # a realistic Adam state without running a step (no transient gradients)
        opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.rand(p.shape, generator=g) * 1e-4}
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=g)
    n = torch.full((args.batch,), args.seq)
    ref = torch.randint(0, VOCAB, (args.ref_batch, args.ref_len), generator=g)
    mask = torch.ones_like(ref, dtype=torch.bool)
    mask[:, 0] = False
    w = torch.ones(args.batch)
    return model, opt, (ids, n, w, ref, mask)


def run_mode(mode, model, opt, data):
    ids, n, w, ref, mask = data
    if mode == "plain":
        loss = (w * per_sample_nll(model(input_ids=ids).logits, ids, n)).sum() / len(w)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return
    P = adam_lookahead(opt, model)  # what DWMWeighter uses: the lookahead is AdamW's real next step
    r = hypergradient(model, ids, n, w, ref, mask, lr=3e-4, precond=P, backend="exact" if mode == "exact" else "fd",
                      measure_before=(mode != "fd_nolog"))
    assert r.ok, r.reason


def measure_memory(args) -> None:
    """Child process: print {"setup_mb", "extra_mb"} for one mode."""
    model, opt, data = setup(args)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_mode(args.measure_memory, model, opt, data)  # the peak is reached within one step
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"setup_mb": base / 1024, "extra_mb": (peak - base) / 1024}))


def _f64_rmsnorm(self, x):
    """HF's LlamaRMSNorm rounds through float32; the float64 ground truth must not."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * y


def eps_sweep() -> list[str]:
    """fd (float32) vs exact (float64 copy of the same model) for a range of fd_eps, SGD and Adam lookaheads.

    Model `tiny` (vocab 300) after 20 AdamW steps, batch 8 x 64, reference 8 x 64, non-uniform weights.
    """
    import copy
    import types

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    V = 300
    m32 = build_model("tiny", V, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (8, 64), generator=g)
    n = torch.full((8,), 64)
    ref = torch.randint(0, V, (8, 64), generator=g)
    mask = torch.ones_like(ref, dtype=torch.bool)
    mask[:, 0] = False
    w = torch.ones(8) + 0.5 * torch.randn(8, generator=g).clamp(-1, 1)
    opt = torch.optim.AdamW(m32.parameters(), lr=1e-3)
    for _ in range(20):
        per_sample_nll(m32(input_ids=ids).logits, ids, n).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    m64 = copy.deepcopy(m32).double()
    for mod in m64.modules():
        if isinstance(mod, LlamaRMSNorm):
            mod.forward = types.MethodType(_f64_rmsnorm, mod)
    theta = torch.cat([p.detach().flatten() for p in m32.parameters()])
    lines = ["## fd_eps sweep (float32 fd vs float64 exact)", "",
             (f"Model `tiny` ({theta.numel()} parameters, ||theta|| = {float(theta.norm()):.2f}, "
             f"rms = {float(theta.norm()) / theta.numel() ** 0.5:.3f}), batch 8 x 64, reference 8 x 64, after 20 "
             "AdamW steps. The perturbation norm eps*||v|| equals fd_eps here (rms < 1). rel = ||fd - exact|| / "
             "||exact||."), "", "| fd_eps | SGD cos | SGD rel | Adam cos | Adam rel |", "|---|---|---|---|---|"]
    res = {}
    for prec, lr in (("sgd", 0.1), ("adam", 1e-3)):
        P32 = adam_preconditioner(opt, m32) if prec == "adam" else None
        P64 = {k: v.double() for k, v in P32.items()} if P32 else None
        ex = hypergradient(m64, ids, n, w.double(), ref, mask, lr=lr, precond=P64, backend="exact").dL_dw
        for e in (1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0):
            r = hypergradient(m32, ids, n, w, ref, mask, lr=lr, precond=P32, backend="fd", fd_eps=e).dL_dw.double()
            res[(prec, e)] = (float(torch.nn.functional.cosine_similarity(r, ex, dim=0)),
                              float((r - ex).norm() / ex.norm()))
    for e in sorted({e for _, e in res}):
        (cs, rs), (ca, ra) = res[("sgd", e)], res[("adam", e)]
        lines.append(f"| {e:g} | {cs:.6f} | {rs:.1e} | {ca:.6f} | {ra:.1e} |")
        print(lines[-1], flush=True)
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-base")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ref-batch", type=int, default=8)
    ap.add_argument("--ref-len", type=int, default=256, help="reference passage length (LAMBADA is ~100 tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bilevel.md"))
    ap.add_argument("--eps-sweep-only", action="store_true",
                    help="only (re)write the fd_eps sweep section of --out (tiny model, ~30 s)")
    ap.add_argument("--measure-memory", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        measure_memory(args)
        return 0
    out = Path(args.out)
    if args.eps_sweep_only:
        head = out.read_text().split("## fd_eps sweep")[0] if out.is_file() else ""
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(head + "\n".join(eps_sweep()))
        print(f"wrote {out}")
        return 0

    mem = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--measure-memory", mode, "--preset", args.preset, "--seq", str(args.seq),
               "--batch", str(args.batch), "--ref-batch", str(args.ref_batch), "--ref-len", str(args.ref_len),
               "--threads", str(args.threads)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        mem[mode] = json.loads(line)
        print(f"memory {mode}: {mem[mode]}", flush=True)

    model, opt, data = setup(args)
    run_mode("plain", model, opt, data)  # warm-up (allocator, kernels)
    run_mode("fd", model, opt, data)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in MODES:
            t0, c0 = time.perf_counter(), time.process_time()
            run_mode(mode, model, opt, data)
            times[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
        print(f"repeat {r}: " + ", ".join(f"{m} {times[m][-1]:.2f}s wall {cpu[m][-1]:.2f}s cpu" for m in MODES),
              flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    cmed = {m: statistics.median(v) for m, v in cpu.items()}

    base_mem = mem["plain"]["extra_mb"]
    base_total = mem["plain"]["setup_mb"] + base_mem
    rows = []
    for m in MODES:
        total = mem[m]["setup_mb"] + mem[m]["extra_mb"]
        rows.append(f"| {m} | {cmed[m]:.2f} | {cmed[m] / cmed['plain']:.2f} | {med[m]:.2f} | "
                    f"{med[m] / med['plain']:.2f} | {mem[m]['extra_mb']:.0f} | "
                    f"{mem[m]['extra_mb'] / base_mem:.2f} | {total:.0f} | {total / base_total:.2f} |")
        print(f"{m:9s} cpu {cmed[m]:.2f}s ratio {cmed[m] / cmed['plain']:.2f}  "
              f"wall {med[m]:.2f}s ratio {med[m] / med['plain']:.2f}  "
              f"mem +{mem[m]['extra_mb']:.0f} MB ratio {mem[m]['extra_mb'] / base_mem:.2f}  "
              f"total {total:.0f} MB ratio {total / base_total:.2f}")
    fd_t, fd_m = cmed["fd"] / cmed["plain"], mem["fd"]["extra_mb"] / base_mem
    text = "\n".join([
        "# Bi-level update cost vs one plain LM step",
        "",
        (f"Model `{args.preset}` ({count_params(model) / 1e6:.1f}M parameters, vocab {VOCAB}), float32, sdpa "
        f"attention; training batch {args.batch} x {args.seq} tokens, reference batch {args.ref_batch} x "
        f"{args.ref_len}; lookahead = AdamW next step (adam_lookahead). {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs (shared with other jobs while measured)."),
        (f"Time: median of {args.repeats} interleaved repeats (CPU = process CPU time; wall is load-sensitive). Memory: each mode in its own process; "
        "'step MB' = peak RSS minus RSS after setup (model + AdamW state + data); 'total' adds the setup."),
        ("`fd` includes the no-grad reference forward that logs L_ref(theta); `fd_nolog` skips it "
        "(`measure_before=False`). `exact` is the double-backward reference (eager attention)."),
        "",
        ("| mode | CPU s | CPU / plain | wall s | wall / plain | step MB | step MB / plain | total MB "
         "| total / plain |"),
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        (f"Goals for `fd`: time (CPU) <= 3.0x ({'met' if fd_t <= 3.0 else 'NOT met'}: {fd_t:.2f}), "
        f"memory <= 1.5x ({'met' if fd_m <= 1.5 else 'NOT met'}: {fd_m:.2f} on the step's own memory, "
        f"{(mem['fd']['setup_mb'] + mem['fd']['extra_mb']) / base_total:.2f} on the total)."),
        "",
        "Command: `" + " ".join([".venv/bin/python benchmarks/bench_bilevel.py", *sys.argv[1:]]) + "`",
        "",
        *eps_sweep(),
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
