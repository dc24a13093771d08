"""`dwm plan RECIPE [key=value ...]`: parameters, FLOPs, peak memory per device and time of a run, before step 0.

The recipe and overrides load exactly as for `dwm train` (dwm.run). seq_len and vocab_size come from data.dir's
meta.json when it exists, else from --seq-len / --vocab-size (paper-* models: 2048 and 32000 by default).

Per optimizer step: tokens = train.global_batch_tokens; model FLOPs = tokens * (6 N_mm + 12 L d T)
(dwm.train.memory: N_mm the matmul weights incl. the LM head, L layers, d hidden, T seq_len); with activation
checkpointing the hardware runs 8 N_mm + 16 L d T per token. Time = hardware FLOPs / (GPUs x MFU x peak FLOP/s).

Per bi-level update (weighting.mode = dwm, each learning stage's updates_per_stage updates), as the 'fd'
hypergradient runs it (dwm.weighting.bilevel): with n probed samples (weighting.advanced.batch_size, 0 = the global batch
G) of length T_p (weighting.advanced.probe_len or seq_len) and R = weighting.advanced.ref_batch_size reference passages (counted at
seq_len, an upper bound):
    one weighted forward+backward over the first min(G, n):   3 * F(T_p) * min(G, n) * T_p
    one reference forward+backward and one no-grad forward:   4 * F(T)   * R * T
    two no-grad forwards per probed sample:                   2 * F(T_p) * n * T_p
F(T) = 2 N_mm + 4 L d T, one forward's FLOPs per token (+1 forward per backward with activation checkpointing).
The weighting network's own forwards (scoring, phi's steps) are small against the LM's and not counted.

Memory (simulated: the real step traced under FakeTensorMode, dwm.train.memory; bf16 autocast on GPU when
train.precision is auto/bf16): weights, grads, optimizer (AdamW: 2 fp32 states), activations at
train.micro_batch_size; 'ddp' keeps a second copy of the gradients in its buckets, 'fsdp' divides weights, grads
and optimizer by the GPU count plus the all-gathered root unit and one decoder layer. A bi-level update runs
between steps (the gradients are freed then) and holds the weights, the optimizer state (and DDP's buckets) + 3 fp32
parameter-sized copies (saved parameters, preconditioner, one gradient buffer) + one micro-batch's activations.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from dwm import config as C
from dwm.errors import UserError
from dwm.run import RunConfig, bilevel_param_copies, load_config, resolve_config_path
from dwm.train.config import Plan, make_plan
from dwm.train.memory import (
    GIB,
    DeviceMemory,
    flops_per_token,
    fmt_gib,
    forward_flops_per_token,
    model_shape,
    plan_memory,
)

PAPER_SEQ, PAPER_VOCAB = 2048, 32000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a shipped recipe name (e.g. paper-370m-dwm) or a TOML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, as for `dwm train` (right after RECIPE, before the options)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (data-parallel ranks)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GiB")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the time")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak TFLOP/s of one GPU (H100 bf16 dense: 989)")
    p.add_argument("--seq-len", type=int, default=0,
                   help="seq_len when data.dir has no meta.json (default: 2048 for paper-* models)")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="vocab size when data.dir has no meta.json (default: 32000 for paper-* models)")


def _check_args(args: argparse.Namespace) -> None:
    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    if not args.gpu_memory > 0:
        raise UserError(f"--gpu-memory must be > 0 GiB, got {args.gpu_memory}")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")
    if not args.peak_tflops > 0:
        raise UserError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.seq_len < 0 or args.vocab_size < 0:
        raise UserError("--seq-len and --vocab-size must be positive")


def data_geometry(cfg: RunConfig, seq_len: int = 0, vocab_size: int = 0) -> tuple[int, int, str]:
    """(seq_len, vocab_size, where they came from): data.dir's meta.json, else the flags, else paper defaults."""
    meta = Path(cfg.data.dir) / "meta.json"
    if meta.is_file():
        from dwm.data.dataset import read_meta

        m = read_meta(cfg.data.dir)
        return int(m["seq_len"]), int(m["vocab_size"]), f"{cfg.data.dir}/meta.json"
    paper = cfg.model.spec.startswith("paper-")
    seq = seq_len or (PAPER_SEQ if paper else 0)
    vocab = vocab_size or (PAPER_VOCAB if paper else 0)
    if not seq or not vocab:
        raise UserError(f"{cfg.data.dir} has no meta.json (no prepared data here): give --seq-len and --vocab-size")
    return seq, vocab, f"assumed: no prepared data at {cfg.data.dir}"


def n_updates(cfg: RunConfig, total_steps: int) -> tuple[int, int]:
    """(bi-level updates of the run, updates per learning stage) as DWMWeighter schedules them."""
    w = cfg.weighting
    if bilevel_param_copies(cfg) == 0:
        return 0, 0
    if w.schedule == "interleaved":
        return total_steps // w.interval, 1
    per = w.advanced.updates_per_stage or max(1, round(w.advanced.update_fraction * total_steps / w.stages))
    return (w.stages - w.advanced.uniform_stages - w.advanced.frozen_stages) * per, per


def update_flops(cfg: RunConfig, plan: Plan, shape, recompute: bool) -> float:
    """FLOPs of one bi-level update (module docstring)."""
    w = cfg.weighting
    T, Tp = plan.seq_len, (min(w.advanced.probe_len, plan.seq_len) if w.advanced.probe_len else plan.seq_len)
    n = w.advanced.batch_size or plan.global_batch_size
    g = min(plan.global_batch_size, n)
    F, Fp = forward_flops_per_token(shape, T), forward_flops_per_token(shape, Tp)
    back = 3.0 if recompute else 2.0  # a backward (+1 recomputed forward)
    return ((1 + back) * Fp * g * Tp + (1 + back) * F * w.advanced.ref_batch_size * T + F * w.advanced.ref_batch_size * T
            + 2 * Fp * n * Tp)


def _hours(s: float) -> str:
    return f"{s / 3600:,.1f} h" if s >= 3600 else (f"{s / 60:.1f} min" if s >= 60 else f"{s:.2f} s")


def make_report(cfg: RunConfig, gpus: int, gpu_memory_gib: float, mfu: float, peak_tflops: float,
                seq_len: int = 0, vocab_size: int = 0) -> dict:
    """Every number `dwm plan` prints (bytes, FLOPs, seconds)."""
    C.validate(cfg)
    seq, vocab, source = data_geometry(cfg, seq_len, vocab_size)
    plan = make_plan(cfg, seq, vocab, gpus)
    t = cfg.train
    gpu = t.device != "cpu"
    shape = model_shape(cfg.model.spec, vocab, seq)
    copies = bilevel_param_copies(cfg)
    mem = plan_memory(cfg.model.spec, vocab, seq, plan.micro_batch_size, accum=plan.grad_accum,
                      precision=t.precision, device_type="cuda" if gpu else "cpu",
                      activation_checkpointing=t.activation_checkpointing, gpus=gpus, parallel=t.parallel,
                      attn_implementation=cfg.model.attn_implementation, update_param_copies=copies, shape=shape)
    model_fpt, hw_fpt = flops_per_token(shape, seq, recompute=t.activation_checkpointing)
    tokens = plan.global_batch_size * seq
    rate = gpus * mfu * peak_tflops * 1e12
    step_s = tokens * hw_fpt / rate
    updates, per_stage = n_updates(cfg, plan.total_steps)
    upd_flops = update_flops(cfg, plan, shape, t.activation_checkpointing) if copies else 0.0
    upd_s = upd_flops / rate
    run_s = plan.total_steps * step_s + updates * upd_s
    rep = {"cfg": cfg, "plan": plan, "seq_source": source, "shape": shape, "mem": mem, "gpus": gpus,
           "gpu_memory": gpu_memory_gib * GIB, "mfu": mfu, "peak_tflops": peak_tflops, "tokens_per_step": tokens,
           "model_flops_step": tokens * model_fpt, "hw_flops_step": tokens * hw_fpt, "step_s": step_s,
           "updates": updates, "updates_per_stage": per_stage, "update_flops": upd_flops, "update_s": upd_s,
           "run_s": run_s, "gpu_hours": run_s * gpus / 3600, "gpu": gpu}
    if cfg.weighting.apply == "resample" and copies:
        rep["stream_tokens"] = math.ceil(cfg.weighting.candidates * plan.total_steps * tokens)
    if gpu and mem.peak > rep["gpu_memory"]:
        rep["fixes"] = suggest(cfg, plan, shape, mem, rep["gpu_memory"], gpus, copies)
    return rep


def suggest(cfg: RunConfig, plan: Plan, shape, mem: DeviceMemory, limit: float, gpus: int, copies: int) -> list[str]:
    """Settings that would fit, each re-planned (micro-batch halvings, activation checkpointing, fsdp)."""
    t = cfg.train
    out = []

    def peak(**kw) -> float:
        args = {"accum": plan.grad_accum, "precision": t.precision, "device_type": "cuda",
                "activation_checkpointing": t.activation_checkpointing, "gpus": gpus, "parallel": t.parallel,
                "attn_implementation": cfg.model.attn_implementation, "update_param_copies": copies,
                "shape": shape}
        mb = kw.pop("micro_batch", plan.micro_batch_size)
        if mb != plan.micro_batch_size:
            args["accum"] = plan.local_batch_size // mb
        args.update(kw)
        return plan_memory(cfg.model.spec, plan.vocab_size, plan.seq_len, mb, **args).peak

    mb = plan.micro_batch_size // 2
    while mb >= 1 and plan.local_batch_size % mb == 0:
        p = peak(micro_batch=mb)
        if p <= limit:
            out.append(f"train.micro_batch_size={mb} (peak {fmt_gib(p)})")
            break
        mb //= 2
    if not t.activation_checkpointing:
        p = peak(activation_checkpointing=True)
        if p <= limit:
            out.append(f"train.activation_checkpointing=true (peak {fmt_gib(p)}, ~1.33x the step's FLOPs)")
    if t.parallel == "ddp" and gpus > 1:
        p = peak(parallel="fsdp")
        if p <= limit:
            out.append(f"train.parallel=fsdp (peak {fmt_gib(p)})")
    return out or [("nothing tried fits: fewer samples per micro-batch with activation checkpointing and fsdp, "
                   "or more GPUs")]


def format_report(rep: dict) -> str:
    cfg, plan, shape, mem = rep["cfg"], rep["plan"], rep["shape"], rep["mem"]
    t, w = cfg.train, cfg.weighting
    where = (f"{rep['gpus']} GPU(s) of {rep['gpu_memory'] / GIB:g} GiB, {t.parallel}" if rep["gpu"]
             else "CPU (train.device = cpu)")
    prec = t.precision if t.precision != "auto" else ("auto: bf16 autocast" if rep["gpu"] else "auto: fp32")
    L = [(f"model {cfg.model.spec}: {shape.n_params:,} parameters ({shape.n_matmul:,} in matmuls), "
         f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab_size}"),
         f"data: seq_len {plan.seq_len}, vocab {plan.vocab_size} ({rep['seq_source']})",
         f"devices: {where}; precision {prec}; activation checkpointing {str(t.activation_checkpointing).lower()}",
         "",
         "per optimizer step:",
         f"  tokens {rep['tokens_per_step']:,} ({plan.global_batch_size} samples x {plan.seq_len})",
         (f"  per GPU: {plan.local_batch_size} samples = micro-batch {plan.micro_batch_size} x "
         f"{plan.grad_accum} accumulation steps"),
         f"  FLOPs {rep['model_flops_step']:.3e} (6*N_mm + 12*L*d*T per token)"
         + (f"; {rep['hw_flops_step']:.3e} with the recomputed forward" if t.activation_checkpointing else ""),
         f"  time {rep['step_s']:.3g} s at MFU {rep['mfu']:g} of {rep['peak_tflops']:g} TFLOP/s per GPU",
         f"  peak memory per device (simulated) {fmt_gib(mem.step_peak)}: weights {fmt_gib(mem.step.weights)}, "
         f"grads {fmt_gib(mem.step.grads)}, optimizer {fmt_gib(mem.step.optimizer)}, activations "
         f"{fmt_gib(mem.step.activations)}" + (f", CPU heap {fmt_gib(mem.heap)}" if mem.heap else "")]
    if rep["updates"]:
        n = w.advanced.batch_size or plan.global_batch_size
        L += ["",
              (f"per bi-level update ({w.backend}; {n} probed samples, {min(n, plan.global_batch_size)} weighted, "
              f"{w.advanced.ref_batch_size} reference passages):"),
              f"  FLOPs {rep['update_flops']:.3e}, time {rep['update_s']:.3g} s",
              (f"  peak memory per device (simulated) {fmt_gib(mem.update_peak)}: weights and optimizer state + "
              f"{fmt_gib(mem.update_extra)} of 3 fp32 parameter copies + one micro-batch's activations"),
              f"  updates: {rep['updates']} ({rep['updates_per_stage']} per learning stage, {w.schedule})"]
    else:
        L += ["", f"no bi-level updates (weighting.mode = {w.mode})"]
    L += ["",
          f"whole run: {plan.total_steps:,} steps ({plan.total_steps * rep['tokens_per_step']:.3g} tokens)"
          + (f" + {rep['updates']} bi-level updates" if rep["updates"] else ""),
          f"  {_hours(rep['run_s'])} wall clock, {rep['gpu_hours']:,.1f} GPU-hours"
          + (f" (bi-level updates {100 * rep['updates'] * rep['update_s'] / rep['run_s']:.1f}% of it)"
             if rep["updates"] else "")]
    if "stream_tokens" in rep:
        L.append(f"  weighting.apply = resample: the data stream must hold {rep['stream_tokens']:.3g} tokens "
                 f"({w.candidates:g} candidates x the {plan.total_steps * rep['tokens_per_step']:.3g}-token budget)")
    if rep["gpu"]:
        lim = rep["gpu_memory"]
        if mem.peak > lim:
            L += ["", f"DOES NOT FIT: peak {fmt_gib(mem.peak)} > {fmt_gib(lim)} per GPU by {fmt_gib(mem.peak - lim)}; "
                      "would fit with: " + "; or ".join(rep["fixes"])]
        else:
            L += ["", f"fits: peak {fmt_gib(mem.peak)} of {fmt_gib(lim)} per GPU ({fmt_gib(lim - mem.peak)} free)"]
    return "\n".join(L)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    path = resolve_config_path(args.recipe, None, False)
    cfg = load_config(path, args.overrides)
    print(format_report(make_report(cfg, args.gpus, args.gpu_memory, args.mfu, args.peak_tflops, args.seq_len,
                                    args.vocab_size)))
    return 0



