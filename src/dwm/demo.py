"""`dwm demo`: the README's main job, end to end on the shipped data.

1. prepare the shipped corpus (data/corpus) into OUT/data (byte-level BPE, 8k vocab, 256-token samples);
2. train `cpu-mini` (1.4M parameters; `--preset cpu-small` is the benchmark's 5.3M model, ~2.5x the time) three
   times on the same token budget and seed: uniform weights; the Data Weighting Model
   learned against the LAMBADA-style `reference` split (recipe cpu-small-dwm, whose scores draw each batch from
   4x as many candidates of the same stream); and the headroom oracle, a
   static domain mixture (default: books only, the best static mixture of the benchmark's grid, chosen there on
   the reference side) given as a selection manifest;
3. evaluate the three on the held-out domains and the `heldout` target split, print them side by side, print the
   DWM's mean weight per domain at every stage and each domain's share of what it trained on (beside its share of
   the corpus), and say in one line what it learned and how much it helped.

The three runs train at the same time, one process each (on two cores this is faster than one after the other).
Each part is skipped when its output is already complete, so a re-run after an interruption continues. Every number
printed comes from this run's files.

Threads and reproducibility. Every run uses one fixed number of torch threads from start to end, training and
evaluation: `--threads`, by default max(1, cores // runs at a time) (`threads_per_run`; cores: those this process
may run on), a function of the machine only, never of when the other runs finish. The thread count changes how CPU
kernels split their sums, hence the last bits of the numbers (one cpu-mini batch's gradients differ by up to 3e-8
between 1 and 2 threads, measured), and such differences can grow over 150 steps. What reproduces bit for bit: the
same command at the same thread count, on the same kind of CPU with the same torch build (a re-run, or a fresh clone
on another machine of the same type); on this project's 2-core VMs the default is 1 thread for each of the three
runs, the layout of the DWM benchmark's runs (benchmarks/bench_dwm.py, 1 thread each). What does not: another thread
count (a machine with 6 or more cores gives each run 2 or more by default: `--threads 1` keeps the 2-core layout),
another CPU (other vector instructions round differently) or another torch build; expect the printed numbers to
move in their last digits there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from dwm import rundir
from dwm.errors import UserError

REPO = Path(__file__).resolve().parents[2]
ARMS = ("uniform", "dwm", "oracle")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="demo directory (data, runs, results)")
    p.add_argument("--corpus", default=str(REPO / "data" / "corpus"), help="corpus directory or files to prepare")
    p.add_argument("--reference", default=str(REPO / "data" / "target" / "reference.jsonl"),
                   help="LAMBADA-format passages the weighting model optimises against")
    p.add_argument("--heldout", default=str(REPO / "data" / "target" / "heldout.jsonl"),
                   help="LAMBADA-format passages that are reported (disjoint from --reference)")
    p.add_argument("--oracle", default="books=1.0",
                   help="the static mixture of the oracle arm, domain=share pairs (the rest uniform over the other "
                        "domains); 'none' skips the arm")
    p.add_argument("--steps", type=int, default=150, help="LM optimizer steps per run")
    p.add_argument("--batch-tokens", type=int, default=4096, help="global batch in tokens")
    p.add_argument("--preset", default="cpu-mini",
                   help="model preset (cpu-mini fits the demo in 5-9 minutes on 2 cores from a fresh clone; cpu-small, "
                        "the benchmark's model, takes ~20)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary of the prepared corpus")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample")
    p.add_argument("--max-passages", type=int, default=500, help="heldout passages to evaluate")
    p.add_argument("--jobs", type=int, default=3, help="runs trained at the same time (one process each)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of each run, fixed for the whole run (default 0: max(1, cores // jobs); "
                        "numbers are bit-identical only at the same thread count, see `dwm demo` docs)")
    p.add_argument("override", nargs="*", metavar="key=value", help="extra overrides for every run")


def _finished(run: Path, steps: int) -> bool:
    latest = rundir.RunDir(run).latest_checkpoint()
    return latest is not None and latest.name == f"step_{steps:08d}"


def _cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_run(cores: int, jobs: int, threads: int = 0) -> int:
    """Torch threads of each run: `threads` when given (> 0), else the cores shared evenly by the runs that train
    at the same time, at least 1. A function of the machine only: fixed before any run starts."""
    if threads < 0:
        raise UserError(f"--threads must be >= 0 (0: cores // jobs), got {threads}")
    return threads or max(1, cores // max(1, jobs))


def train_and_eval(arm: str, run: Path, overrides: list, steps: int, heldout: str, max_passages: int,
                   threads: int) -> dict[str, Any]:
    """One arm, in its own process: train `run` (or resume, or skip when finished), then evaluate, with `threads`
    torch threads throughout."""
    import torch

    from dwm.eval.cli import evaluate
    from dwm.run import recipe_path, train

    torch.set_num_threads(threads)
    if not _finished(run, steps):
        print(f"[demo] train {arm} -> {run} ({threads} thread{'s' * (threads > 1)})", file=sys.stderr, flush=True)
        train(recipe_path("cpu-small-dwm" if arm == "dwm" else "cpu-small-uniform"), overrides=overrides,
              resume=rundir.RunDir(run).latest_checkpoint() is not None)
    return evaluate(run, target=heldout, max_passages=max_passages, device="cpu")


def _stage_means(files: dict[int, Path], column: str) -> dict[int, dict[str, float]]:
    """Mean of a column per domain in each stage file (probes/ or signal/, dwm.rundir)."""
    from dwm.analysis.measures import group_means

    out = {}
    for k, f in files.items():
        t = rundir.read_table(f, columns=["domain", column]).to_pydict()
        out[k] = {d: g["mean"] for d, g in group_means(t["domain"], t[column]).items()}
    return out


def stage_weights(run: Path) -> list[dict[str, float]]:
    """Mean probe weight per domain at each stage, from the run's probes/stage_k.parquet."""
    return list(_stage_means(rundir.stage_map(rundir.RunDir(run).probes, ".parquet"), "weight").values())


def stage_signal(run: Path) -> dict[int, dict[str, float]]:
    """Mean hypergradient signal (-dL/dw on phi's scale) per domain of the samples each stage's bi-level updates
    probed, from the run's signal/stage_k.parquet: what the weighting model learned from (stages without an update
    have no file)."""
    return _stage_means(rundir.stage_map(rundir.RunDir(run).signal, ".parquet"), "signal")


def signal_table(signal: dict[int, dict[str, float]], domains: list[str]) -> str:
    width = max(8, *(len(d) for d in domains))
    lines = ["stage  " + "".join(d.rjust(width + 1) for d in domains)]
    for k, m in signal.items():
        lines.append(f"{k:>5}  " + "".join((f"{m[d]:+.2f}" if d in m else "-").rjust(width + 1) for d in domains))
    return "\n".join(lines)


def stage_table(weights: list[dict[str, float]], shares: dict[str, float] | None = None,
                corpus: dict[str, float] | None = None) -> str:
    doms = sorted(weights[0])
    width = max(8, *(len(d) for d in doms))
    lines = ["stage  " + "".join(d.rjust(width + 1) for d in doms)]
    for k, w in enumerate(weights):
        lines.append(f"{k:>5}  " + "".join(f"{w[d]:>{width + 1}.2f}" for d in doms))
    for name, row in (("trained share (whole run)", shares), ("corpus share", corpus)):
        if row:
            lines.append(f"{name}:\n       " + "".join(f"{row.get(d, 0.0):>{width + 1}.3f}" for d in doms))
    return "\n".join(lines)


def in_words(results: dict[str, dict[str, Any]], weights: list[dict[str, float]],
             shares: dict[str, float] | None = None, corpus: dict[str, float] | None = None) -> str:
    """One line: what the weighting model learned (its last stage's top and bottom domains), how much of the
    training its top domain then carried, and what it did to the heldout passage loss, against the oracle's
    headroom when there is one."""
    last = weights[-1]
    order = sorted(last, key=lambda d: -last[d])
    top, bottom = [d for d in order[:2] if last[d] > 1], [d for d in order[::-1][:2] if last[d] < 1]
    loss = {a: r["lambada"]["passage_loss"] for a, r in results.items()}
    diff = loss["dwm"] - loss["uniform"]
    s = f"DWM learned to favour {' and '.join(top) or 'no domain'} and to avoid {' and '.join(bottom) or 'none'} (last stage)"
    if top and shares and corpus and top[0] in shares:
        s += (f"; {top[0]} carried {100 * shares[top[0]]:.0f}% of its training loss ({100 * corpus.get(top[0], 0):.0f}% "
              f"of the corpus)")
    s += (f"; on the heldout passages it {'lowered' if diff < 0 else 'raised'} the loss by {abs(diff):.3f} nats "
          f"against uniform")
    if "oracle" in loss:
        gap = loss["uniform"] - loss["oracle"]
        s += (f"; the static oracle mixture lowered it by {gap:.3f}, so DWM recovered {100 * -diff / gap:.0f}% of "
              f"that headroom" if gap > 0 else f"; the static oracle mixture did not beat uniform ({-gap:+.3f})")
    return s + " (one seed: see benchmarks/results/dwm.md for the 3-seed comparison)."


def run(args: argparse.Namespace) -> int:
    from dwm.analysis.runs import trained_shares
    from dwm.data.dataset import PreparedData
    from dwm.data.mixture import mixture_ids, parse_shares, write_manifest
    from dwm.data.prepare import prepare_data
    from dwm.eval.cli import format_table

    out = Path(args.out)
    corpus = Path(args.corpus)
    if not corpus.exists():
        raise UserError(f"corpus {corpus} not found (the shipped corpus lives in data/corpus; "
                        f"`dwm corpus build` rebuilds it)")
    for p in (args.reference, args.heldout):
        if not Path(p).is_file():
            raise UserError(f"target file {p} not found (`dwm target build` builds it)")
    arms = [a for a in ARMS if a != "oracle" or args.oracle.lower() != "none"]
    jobs = max(1, min(args.jobs, len(arms)))
    threads = threads_per_run(_cores(), jobs, args.threads)  # fixed before anything runs
    t0 = time.perf_counter()
    print(f"[demo] 1/3 prepare {corpus} -> {out / 'data'}", file=sys.stderr)
    prepare_data([corpus], out / "data", vocab_size=args.vocab_size, seq_len=args.seq_len)

    common = {"data.dir": out / "data", "model.spec": args.preset, "train.max_steps": args.steps,
              "train.global_batch_tokens": args.batch_tokens, "optim.warmup_steps": max(1, args.steps // 10),
              "checkpoint.every": 50, "weighting.reference": args.reference}
    # the user's key=value overrides come after the common ones, the arm's own (its run directory, ...) last
    own: dict[str, dict[str, Any]] = {a: {"out": out / a} for a in arms}
    # the stage table needs the probes' weights only; their LM loss (for `dwm analyze`) would add a no-grad LM
    # forward of the probe set at every stage to the longest arm; training is the same either way
    own["dwm"]["weighting.advanced.probe_lm_loss"] = False
    data = PreparedData(out / "data", "train")
    if "oracle" in arms:
        ids = mixture_ids(data.domain_ids, data.domains, parse_shares(args.oracle),
                          args.steps * args.batch_tokens // data.seq_len, seed=0)
        own["oracle"]["data.selection"] = write_manifest(ids, out / "oracle_mixture.parquet")
    overrides = {a: [common, *args.override, own[a]] for a in arms}
    print(f"[demo] 2/3 train {', '.join(arms)} ({args.preset}, {args.steps} steps x {args.batch_tokens} tokens, "
          f"{jobs} at a time, {threads} thread{'s' * (threads > 1)} each) and evaluate", file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    if jobs == 1:
        for a in arms:
            results[a] = train_and_eval(a, out / a, overrides[a], args.steps, args.heldout, args.max_passages,
                                        threads)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from dwm.host import die_with_parent

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=die_with_parent) as ex:
            futs = {a: ex.submit(train_and_eval, a, out / a, overrides[a], args.steps, args.heldout,
                                 args.max_passages, threads) for a in arms}
            results = {a: f.result() for a, f in futs.items()}

    print("[demo] 3/3 results", file=sys.stderr)
    weights = stage_weights(out / "dwm")
    shares = trained_shares(out / "dwm")
    corpus_share = {d: float((data.domain_ids == i).mean()) for i, d in enumerate(data.domains)}
    names = {"uniform": "uniform", "dwm": "dwm", "oracle": f"oracle ({args.oracle})"}
    table = format_table({names[a]: results[a] for a in arms})
    signal = stage_signal(out / "dwm")
    said = (f"\n\nWhat it learned from: the mean hypergradient signal -dL/dw of each domain's probed samples, stage "
            f"by stage\n(std units; the higher, the more weighting the domain up lowers the reference loss)\n"
            f"{signal_table(signal, sorted(weights[0]))}" if signal and weights else "")
    text = (f"{table}\n\nDWM: mean weight of each domain's probe samples, stage by stage (1 = uniform)\n"
            f"{stage_table(weights, shares, corpus_share)}{said}\n\n"
            f"{in_words(results, weights, shares, corpus_share)}")
    layout = f"{jobs} run{'s' * (jobs > 1)} at a time, {threads} torch thread{'s' * (threads > 1)} each"
    (out / "results.md").write_text(f"# dwm demo ({args.preset}, {args.steps} steps x {args.batch_tokens} tokens; "
                                    f"{layout})\n\n```\n{text}\n```\n")
    (out / "results.json").write_text(json.dumps({**results, "stage_weights": weights, "stage_signal": signal,
                                                  "trained_share": shares, "corpus_share": corpus_share,
                                                  "threads_per_run": threads, "jobs": jobs}, indent=2,
                                                 default=str))
    print(text)
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s; results in {out / 'results.md'}", file=sys.stderr)
    return 0
