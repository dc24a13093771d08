"""`dwm demo`: the README's main job, end to end on the shipped data.

1. prepare the shipped corpus (data/corpus) into OUT/data (byte-level BPE, 8k vocab, 256-token samples);
2. train `cpu-small` twice on the same data, order and token budget: uniform weights, and with the Data Weighting
   Model learned against the LAMBADA-style `reference` split (recipes cpu-small-uniform / cpu-small-dwm);
3. evaluate both on the held-out domains and the `heldout` target split and print them side by side.

Each part is skipped when its output is already complete, so a re-run after an interruption continues.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dwm.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="demo directory (data, runs, results)")
    p.add_argument("--corpus", default=str(REPO / "data" / "corpus"), help="corpus directory or files to prepare")
    p.add_argument("--reference", default=str(REPO / "data" / "target" / "reference.jsonl"),
                   help="LAMBADA-format passages the weighting model optimises against")
    p.add_argument("--heldout", default=str(REPO / "data" / "target" / "heldout.jsonl"),
                   help="LAMBADA-format passages that are reported (disjoint from --reference)")
    p.add_argument("--steps", type=int, default=150, help="LM optimizer steps per run")
    p.add_argument("--batch-tokens", type=int, default=4096, help="global batch in tokens")
    p.add_argument("--preset", default="cpu-small", help="model preset")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary of the prepared corpus")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample")
    p.add_argument("--max-passages", type=int, default=500, help="heldout passages to evaluate")
    p.add_argument("override", nargs="*", metavar="key=value", help="extra overrides for both runs")


def _finished(run: Path, steps: int) -> bool:
    latest = run / "checkpoints" / "LATEST"
    return latest.is_file() and latest.read_text().strip() == f"step_{steps:08d}"


def run(args: argparse.Namespace) -> int:
    from dwm.data.prepare import PrepareOptions, prepare
    from dwm.eval.cli import evaluate_run, format_table
    from dwm.run import build_trainer, load_config, recipe_path

    out = Path(args.out)
    corpus = Path(args.corpus)
    if not corpus.exists():
        raise UserError(f"corpus {corpus} not found (the shipped corpus lives in data/corpus; "
                        f"`dwm corpus build` rebuilds it)")
    for p in (args.reference, args.heldout):
        if not Path(p).is_file():
            raise UserError(f"target file {p} not found (`dwm target build` builds it)")
    t0 = time.perf_counter()
    print(f"[demo] 1/3 prepare {corpus} -> {out / 'data'}", file=sys.stderr)
    prepare([corpus], out / "data", PrepareOptions(vocab_size=args.vocab_size, seq_len=args.seq_len))

    results = {}
    for name in ("uniform", "dwm"):
        run_dir = out / name
        overrides = [f"data.dir={out / 'data'}", f"out={run_dir}", f"model.spec={args.preset}",
                     f"train.max_steps={args.steps}", f"train.global_batch_tokens={args.batch_tokens}",
                     f"optim.warmup_steps={max(1, args.steps // 10)}", "checkpoint.every=50",
                     f"weighting.reference={args.reference}", *args.override]
        if _finished(run_dir, args.steps):
            print(f"[demo] 2/3 {name}: already trained", file=sys.stderr)
        else:
            print(f"[demo] 2/3 train {args.preset} with {name} weighting, {args.steps} steps -> {run_dir}",
                  file=sys.stderr)
            resume = (run_dir / "checkpoints" / "LATEST").is_file()
            cfg = load_config(recipe_path(f"cpu-small-{name}"), overrides)
            build_trainer(cfg, resume=resume).train()
        print(f"[demo] 3/3 evaluate {name}", file=sys.stderr)
        results[name] = evaluate_run(run_dir, target=args.heldout, max_passages=args.max_passages)

    table = format_table(results)
    (out / "results.md").write_text(f"# dwm demo ({args.preset}, {args.steps} steps x {args.batch_tokens} tokens)"
                                    f"\n\n```\n{table}\n```\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(table)
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s; results in {out / 'results.md'}", file=sys.stderr)
    return 0
