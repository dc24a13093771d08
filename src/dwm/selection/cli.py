"""`dwm select`: choose documents of a prepared split up to a token budget and write a manifest for
`dwm train --selection` (see dwm/selection/__init__.py for the methods and the manifest format)."""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwm.errors import UserError
from dwm.selection import METHODS
from dwm.selection.engine import ENGINES, make_engine
from dwm.selection.pool import Pool, fill_budget, log, share_table, write_selection
from dwm.selection.pool import write_scores as write_scores_file

DEFAULT_TARGET = "data/target/reference.jsonl"


def default_target() -> Path:
    """data/target/reference.jsonl here, else the one of the repository checkout dwm runs from."""
    p = Path(DEFAULT_TARGET)
    if p.is_file():
        return p
    repo = Path(__file__).resolve().parents[3] / DEFAULT_TARGET
    return repo if repo.is_file() else p


def add_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="prepared data directory (`dwm prepare --out`)")
    p.add_argument("--method", required=required, choices=METHODS,
                   help="random | dsir (importance resampling) | quality (score column, HF classifier or a trained "
                        "classifier) | perplexity (reference LM band) | influence (online, during `dwm train`)")
    p.add_argument("--budget-tokens", required=required, type=int, help="tokens to select (real tokens, not padding)")
    p.add_argument("--out", required=required, help="manifest to write (parquet); a report JSON is written beside it")
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
    g.add_argument("--dsir-score", choices=("mean", "sum"), default="mean",
                   help="mean: a document's mean log importance ratio per n-gram, scaled to a 128-word example (the "
                        "DSIR paper's), so length does not decide; sum: the whole-document sum, as the authors' "
                        "package (its parity mode)")
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


@dataclass
class Selection:
    """What `select_documents` (`dwm.select`) returns: the manifest and its report (the JSON written beside it).
    Path-like: it stands for the manifest (`dwm.train(overrides={"data.selection": sel})`)."""

    manifest: Path
    report: dict[str, Any]

    def __fspath__(self) -> str:
        return str(self.manifest)

    @property
    def report_path(self) -> Path:
        return self.manifest.with_suffix(".json")


def _check_choice(option: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        from dwm.config import did_you_mean

        raise UserError(f"{option} must be one of {', '.join(allowed)}, not {value!r}"
                        f"{did_you_mean(str(value), allowed)}")


def select_documents(data: str | Path, method: str, budget_tokens: int, out: str | Path, *, seed: int = 0,
                     split: str = "train", target: str | Path | None = None, top_k: bool = False,
                     temperature: float | None = None, write_scores: str | Path | None = None,
                     engine: str = "local", ray_address: str | None = None, workers: int = 0,
                     dsir_ngrams: int = 2, dsir_buckets: int = 10000, dsir_features: str = "words",
                     dsir_min_words: int = 100, dsir_score: str = "mean", score_column: str | None = None, score_model: str | None = None,
                     classifier: bool = False, label: int = 0, negatives: int = 0, ref_model: str | None = None,
                     band: str = "lowest", batch_size: int = 16, max_length: int = 512,
                     device: str = "cpu") -> Selection:
    """`dwm select` as a function: score the documents of a prepared split with `method` (random, dsir, quality,
    perplexity), choose up to `budget_tokens` real tokens, write the manifest `out` (parquet, for
    `dwm train data.selection`) and its report beside it (out with suffix .json); returns a Selection.

    The keyword options are `dwm select`'s (`dwm select --help`), named as its flags: target (dsir, the quality
    classifier; default data/target/reference.jsonl), top_k / temperature (dsir, quality), dsir_* (dsir),
    score_column / score_model / classifier (quality: exactly one), ref_model / band (perplexity). Same inputs,
    same seed: the same manifest. Bad input raises UserError."""
    data = os.fspath(data)  # a PreparedInfo stands for its directory
    _check_choice("--method", method, METHODS)
    if method == "influence":
        raise UserError("influence selects online, during training: run `dwm train ... selector.mode=influence` "
                        "(options under [influence], see `dwm train --help-config`)")
    _check_choice("--engine", engine, ENGINES)
    _check_choice("--dsir-features", dsir_features, ("words", "tokens"))
    _check_choice("--dsir-score", dsir_score, ("mean", "sum"))
    _check_choice("--band", band, ("lowest", "middle", "highest"))
    t0 = time.perf_counter()
    pool = Pool(data, split)
    if budget_tokens <= 0:
        raise UserError(f"--budget-tokens must be > 0, got {budget_tokens}")
    if budget_tokens > pool.total_tokens:
        raise UserError(f"--budget-tokens {budget_tokens:,} is larger than the pool ({pool.total_tokens:,} "
                        f"tokens in {len(pool):,} documents of {data} split {split})")
    if temperature is not None and temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    target = Path(target) if target else default_target()
    eng = make_engine(engine, workers, ray_address)
    try:
        if method == "random":
            from dwm.selection import uniform

            res = uniform.score(pool, seed)
            keys = res["scores"]
        elif method == "dsir":
            from dwm.selection import dsir

            t = 1.0 if temperature is None else temperature
            opts = dsir.DSIROptions(dsir_ngrams, dsir_buckets, dsir_features, dsir_min_words, 0.0 if top_k else t,
                                    dsir_score)
            res = dsir.score(pool, opts, target, eng)
            keys = dsir.keys(res, opts, seed)
        elif method == "quality":
            from dwm.selection import quality

            given = [n for n, v in (("column", score_column), ("hf", score_model), ("classifier", classifier)) if v]
            if len(given) != 1:
                raise UserError("--method quality needs exactly one of --score-column, --score-model, --classifier"
                                + (f" (got {len(given)})" if given else ""))
            t = 2.0 if temperature is None else temperature
            opts = quality.QualityOptions(given[0], score_column or "", os.fspath(score_model or ""), label,
                                          max_length, batch_size, negatives, 0.0 if top_k else t)
            res = quality.score(pool, opts, target, eng, seed, device)
            keys = quality.keys(res, opts, seed)
        else:
            from dwm.selection import perplexity

            opts = perplexity.PerplexityOptions(os.fspath(ref_model or ""), band, batch_size, max_length)
            res = perplexity.score(pool, opts, device)
            keys = perplexity.keys(res, opts, seed)
    finally:
        eng.close()
    scores = res["scores"]
    if write_scores:
        write_scores_file(pool, scores, write_scores, method)
    chosen = fill_budget(keys, pool.unit_tokens, budget_tokens, res.get("eligible"))
    info = {"method": method, "settings": {**res["settings"], "top_k": bool(top_k)},
            "budget_tokens": budget_tokens, "engine": engine,
            "seconds": round(time.perf_counter() - t0, 3)}
    report = write_selection(pool, chosen, scores, out, info, seed)
    return Selection(Path(out), report)


OPTIONS = tuple(inspect.signature(select_documents).parameters)  # its parameters = `dwm select`'s dests


def parse_options(argv: list[str], prog: str = "dwm select") -> dict[str, Any]:
    """The `dwm select` arguments in argv (e.g. an experiment recipe's `dsir = "--dsir-ngrams 1"`) as
    select_documents keywords: only those given, none required."""
    p = argparse.ArgumentParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, required=False)
    for action in p._actions:  # no defaults: only what argv gives
        if action.dest in OPTIONS:
            action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    report = select_documents(**{k: getattr(args, k) for k in OPTIONS}).report
    print(share_table(report["shares"]))
    log(f"{args.method}: {report['selected_documents']:,} of {report['pool_documents']:,} documents, "
        f"{report['selected_tokens']:,} tokens ({report['selected_samples']:,} samples) -> {args.out} "
        f"(report {Path(args.out).with_suffix('.json')}) in {report['seconds']:.1f}s")
    if args.write_scores:
        log(f"scores of every document -> {args.write_scores}")
    sys.stdout.flush()
    return 0
