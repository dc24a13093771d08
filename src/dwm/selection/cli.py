"""`dwm select`: choose documents of a prepared split up to a token budget and write a manifest for
`dwm train --selection` (see dwm/selection/__init__.py for the methods and the manifest format)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from dwm.errors import UserError
from dwm.selection.engine import ENGINES, make_engine
from dwm.selection.method import METHODS
from dwm.selection.pool import Pool, fill_budget, log, share_table, write_scores, write_selection

DEFAULT_TARGET = "data/target/reference.jsonl"


def default_target() -> Path:
    """data/target/reference.jsonl here, else the one of the repository checkout dwm runs from."""
    p = Path(DEFAULT_TARGET)
    if p.is_file():
        return p
    repo = Path(__file__).resolve().parents[3] / DEFAULT_TARGET
    return repo if repo.is_file() else p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared data directory (`dwm prepare --out`)")
    p.add_argument("--method", required=True, choices=METHODS.names(),
                   help="random | dsir (importance resampling) | quality (score column, HF classifier or a trained "
                        "classifier) | perplexity (reference LM band) | influence (online, during `dwm train`)")
    p.add_argument("--budget-tokens", required=True, type=int, help="tokens to select (real tokens, not padding)")
    p.add_argument("--out", required=True, help="manifest to write (parquet); a report JSON is written beside it")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choices (same seed, same selection)")
    p.add_argument("--split", default="train", help="split of the prepared directory to select from")
    p.add_argument("--write-scores", metavar="FILE", help="also write every document's score (doc_id, score, "
                                                           "domain, n_tokens) as parquet (default: none)")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: a process pool on this machine; ray: Ray Data tasks over the pool's shards")
    p.add_argument("--ray-address", help="with --engine ray: a cluster address (default: a local Ray instance)")
    p.add_argument("--workers", type=int, default=0, help="processes / Ray CPUs (default 0: all cores)")
    p.add_argument("--target", help=f"dsir and the quality classifier: the target / high-quality reference texts, "
                                    f"a LAMBADA-format JSONL or any text file (default: {DEFAULT_TARGET})")
    p.add_argument("--top-k", action="store_true",
                   help="dsir, quality: take the highest scores instead of Gumbel sampling")
    p.add_argument("--temperature", type=float,
                   help="dsir, quality: Gumbel sampling proportional to exp(score / T) (default: the method's, "
                        "1.0 for dsir's log importance weights, 2.0 for quality as in QuRating)")
    g = p.add_argument_group("dsir")
    g.add_argument("--dsir-ngrams", type=int, default=2, help="n-grams up to this n (2: unigrams + bigrams)")
    g.add_argument("--dsir-buckets", type=int, default=10000, help="hash buckets of the bag-of-n-grams models")
    g.add_argument("--dsir-features", choices=("words", "tokens"), default="words",
                   help="words: n-grams of the decoded text's words, as the authors' package; tokens: of token ids")
    g.add_argument("--dsir-min-words", type=int, default=100,
                   help="documents with fewer words are never selected (the package's min_example_length)")
    g = p.add_argument_group("quality")
    g.add_argument("--score-column", help="a score column of the prepared data (QuRating criteria recognised, also "
                                          "as <name>_average) (default: none)")
    g.add_argument("--score-model", help="a local HF sequence-classification checkpoint directory (default: none)")
    g.add_argument("--classifier", action="store_true",
                   help="train a hashed-n-gram logistic regression between --target (positives) and the pool")
    g.add_argument("--label", type=int, default=0, help="--score-model: the output whose logit is the score")
    g.add_argument("--negatives", type=int, default=0,
                   help="--classifier: pool documents used as negatives (default 0: 4x the positives, <= 20000)")
    g = p.add_argument_group("perplexity")
    g.add_argument("--ref-model", help="reference LM: a dwm run directory or a local HF causal-LM directory "
                                       "(default: none)")
    g.add_argument("--band", choices=("lowest", "middle", "highest"), default="lowest",
                   help="which perplexity band to keep")
    g = p.add_argument_group("models (quality --score-model, perplexity)")
    g.add_argument("--batch-size", type=int, default=16, help="documents or rows per forward")
    g.add_argument("--max-length", type=int, default=512, help="tokens per document window of a model")
    g.add_argument("--device", default="cpu", help="torch device of the model")


def select(args: argparse.Namespace) -> dict[str, Any]:
    """Run the method, choose to the budget, write the outputs; returns the report."""
    method = args.method
    runner = METHODS.get(method)(args)
    t0 = time.perf_counter()
    pool = Pool(args.data, args.split)
    if args.budget_tokens <= 0:
        raise UserError(f"--budget-tokens must be > 0, got {args.budget_tokens}")
    if args.budget_tokens > pool.total_tokens:
        raise UserError(f"--budget-tokens {args.budget_tokens:,} is larger than the pool ({pool.total_tokens:,} "
                        f"tokens in {len(pool):,} documents of {args.data} split {args.split})")
    if args.temperature is not None and args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    target = Path(args.target) if args.target else default_target()
    engine = make_engine(args.engine, args.workers, args.ray_address)
    try:
        res, keys = runner.run(pool, target, engine)
    finally:
        engine.close()
    scores = res["scores"]
    if args.write_scores:
        write_scores(pool, scores, args.write_scores, method)
    chosen = fill_budget(keys, pool.unit_tokens, args.budget_tokens, res.get("eligible"))
    info = {"method": method, "settings": {**res["settings"], "top_k": bool(args.top_k)},
            "budget_tokens": args.budget_tokens, "engine": args.engine,
            "seconds": round(time.perf_counter() - t0, 3)}
    report = write_selection(pool, chosen, scores, args.out, info, args.seed)
    return report


def run(args: argparse.Namespace) -> int:
    report = select(args)
    print(share_table(report["shares"]))
    log(f"{args.method}: {report['selected_documents']:,} of {report['pool_documents']:,} documents, "
        f"{report['selected_tokens']:,} tokens ({report['selected_samples']:,} samples) -> {args.out} "
        f"(report {Path(args.out).with_suffix('.json')}) in {report['seconds']:.1f}s")
    if args.write_scores:
        log(f"scores of every document -> {args.write_scores}")
    sys.stdout.flush()
    return 0
