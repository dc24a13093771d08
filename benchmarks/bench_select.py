"""Benchmark `dwm select` and the online `influence` selector (prints a markdown report; not a test).

1. DSIR on a prepared pool (default: the full ~150 MB corpus, `dwm corpus build --full` then
   `dwm prepare corpus-build/full --out corpus-build/prepared-full`), in its parity mode (`--dsir-score sum`, the
   package's whole-document sum): fit + score + resample with 2 workers, wall and
   CPU time and peak RSS of the `dwm select` process; side by side with the DSIR authors' `data-selection` package
   (HashedNgramDSIR, same pool texts, same target, 2 processes, unigrams + bigrams, 10,000 buckets,
   min_example_length 100, the same number of documents resampled): time ratio and Spearman's rho between the two
   packages' log importance weights (all documents), and the overlap of the two selections.
2. `quality --classifier`: documents/s of the scoring pass and peak RSS, 1 worker and 2.
3. Peak RSS of every method at two pool sizes (the first 25% and 100% of the pool's rows; perplexity with a tiny
   dwm run on 0.5% and 2%: a CPU LM forward over the whole pool would take hours here).
4. `influence`: a whole cpu-small run against uniform training of the same steps and tokens (seconds, ratio), how
   often it re-selects and what it probes.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_select.py [--data corpus-build/prepared-full]
        [--target data/target/reference.jsonl] [--skip-package] [--out benchmarks/results/select.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def child(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, int]:
    """(wall s, CPU s of the process tree, peak RSS MB of its largest process, return code), measured by
    /usr/bin/time: a child forked from this (large) process would start with this process's RSS as its peak."""
    e = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        p = subprocess.run(["/usr/bin/time", "-o", f.name, "-f", "%e %U %S %M", *cmd], check=False, env=e,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=False)
        wall, user, system, rss_kb = f.read().split()[-4:]
    if p.returncode != 0:
        print(p.stderr.decode()[-3000:], file=sys.stderr)
    return float(wall), float(user) + float(system), int(rss_kb) / 1024, p.returncode


def dwm_select(data: Path, out: Path, *args: str, workers: int = 2) -> tuple[float, float, float, dict]:
    cmd = [PY, "-m", "dwm.cli", "select", "--data", str(data), "--out", str(out), "--workers", str(workers), *args]
    wall, cpu, rss, rc = child(cmd)
    if rc != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, cpu, rss, json.loads(out.with_suffix(".json").read_text())


def sub_pool(src: Path, dst: Path, fraction: float) -> Path:
    """A prepared directory holding the first `fraction` of src's train rows (cut at a document boundary)."""
    from dwm.data.dataset import read_meta
    from dwm.selection.pool import Pool

    meta = read_meta(src)
    pool = Pool(src)
    n = int(pool.unit_rows[np.searchsorted(pool.unit_rows, fraction * pool.n_rows)]) if fraction < 1 else pool.n_rows
    dst.mkdir(parents=True, exist_ok=True)
    row_bytes = meta["seq_len"] * np.dtype(meta["dtype"]).itemsize
    with open(src / "train.bin", "rb") as f, open(dst / "train.bin", "wb") as g:
        left = n * row_bytes
        while left:
            block = f.read(min(left, 1 << 24))
            g.write(block)
            left -= len(block)
    pq.write_table(pq.read_table(src / "train.parquet").slice(0, n), dst / "train.parquet")
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    meta = {**meta, "splits": {"train": {"n_samples": n, "n_docs": None}}, "fingerprint": f"{meta.get('fingerprint')}"
            f":{fraction}"}
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


# ------------------------------------------------------------------------------------------ 1. DSIR
def package_dsir(texts_path: Path, target_path: Path, cache: Path, n_docs: int, workers: int) -> None:
    """Run in a child process: the authors' pipeline, timed by the parent."""
    from data_selection import HashedNgramDSIR

    d = HashedNgramDSIR([str(texts_path)], [str(target_path)], cache_dir=str(cache / "cache"), num_proc=workers,
                        ngrams=2, num_buckets=10000, min_example_length=100)
    d.fit_importance_estimator(num_tokens_to_fit="auto")
    d.compute_importance_weights()
    d.resample(out_dir=str(cache / "out"), num_to_sample=n_docs, cache_dir=str(cache / "resample_cache"))


def package_weights(cache: Path, n: int, workers: int) -> np.ndarray:
    """The package's log importance weights in document order (it shards one file virtually: i % shards)."""
    w = np.empty(n)
    for k in range(workers):
        w[k::workers] = np.load(cache / "cache" / "log_importance_weights" / f"{k}.npy")
    return w


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def bench_dsir(data: Path, target: Path, budget: int, tmp: Path, skip_package: bool, lines: list[str]) -> None:
    from dwm.selection.dsir import read_target_texts
    from dwm.selection.pool import Pool, shard_texts

    out = tmp / "dsir.parquet"
    runs = [dwm_select(data, out, "--method", "dsir", "--budget-tokens", str(budget), "--target", str(target),
                       "--dsir-score", "sum", "--write-scores", str(tmp / "dsir_scores.parquet")) for _ in range(2)]
    wall, cpu, rss, rep = min(runs, key=lambda r: r[0])
    pool = Pool(data)
    lines += ["## 1. DSIR: fit + score + resample", "",
              (f"- pool: {data} ({len(pool):,} documents, {pool.total_tokens:,} tokens, "
              f"{(data / 'train.bin').stat().st_size / 1e6:.0f} MB of rows); target {target}; budget {budget:,} "
              f"tokens ({rep['selected_documents']:,} documents)"), "",
              "| run | wall s | CPU s | peak RSS MB |", "|---|---:|---:|---:|",
              (f"| `dwm select --method dsir --dsir-score sum`, 2 workers (best of 2: {', '.join(f'{r[0]:.1f}' for r in runs)}) "
              f"| {wall:.1f} | {cpu:.1f} | {rss:.0f} |")]
    if skip_package:
        lines += ["", "(the data-selection package was skipped: --skip-package)", ""]
        return
    texts_path, target_path = tmp / "pool.jsonl", tmp / "target.jsonl"
    with open(texts_path, "w") as f:
        for shard in pool.shards():
            f.writelines(json.dumps({"text": t}) + "\n" for t in shard_texts(shard))
    with open(target_path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in read_target_texts(target))
    cache = tmp / "pkg"
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from bench_select import package_dsir; "
            f"from pathlib import Path; package_dsir(Path({str(texts_path)!r}), Path({str(target_path)!r}), "
            f"Path({str(cache)!r}), {rep['selected_documents']}, 2)")
    pwall, pcpu, prss, rc = child([PY, "-c", code])
    if rc != 0:
        lines += ["", f"data-selection package failed (rc {rc})", ""]
        return
    ours = pq.read_table(tmp / "dsir_scores.parquet")["score"].to_numpy()
    theirs = package_weights(cache, len(ours), 2)
    rho = spearman(ours, theirs)
    sel_ours = set(pq.read_table(out)["doc_id"].to_pylist())
    pkg_texts = set()
    for f in sorted((cache / "out").glob("*.jsonl")):
        pkg_texts.update(json.loads(x)["text"] for x in f.read_text().splitlines() if x.strip())
    all_ids = pq.read_table(tmp / "dsir_scores.parquet")["doc_id"].to_pylist()
    pkg_ids = set()
    with open(texts_path) as f:
        for i, line in enumerate(f):
            if json.loads(line)["text"] in pkg_texts:
                pkg_ids.add(all_ids[i])
    jac = len(sel_ours & pkg_ids) / max(1, len(sel_ours | pkg_ids))
    lines += [(f"| `data-selection` {_pkg_version()} HashedNgramDSIR, num_proc 2 | {pwall:.1f} | {pcpu:.1f} | "
              f"{prss:.0f} |"), "",
              f"- speed-up (wall): **{pwall / wall:.1f}x** (goal >= 3x); CPU: {pcpu / max(cpu, 1e-9):.1f}x",
              (f"- Spearman's rho between the two packages' log importance weights, {len(ours):,} documents: "
              f"**{rho:.4f}** (goal >= 0.9)"),
              (f"- overlap of the two Gumbel selections (different noise): Jaccard {jac:.2f}; dwm's time includes "
              "decoding the documents from the prepared rows, the package's reads them as JSONL"), ""]


def _pkg_version() -> str:
    from importlib.metadata import version

    return version("data-selection")


# ------------------------------------------------------------------------------------------ 2. quality
def bench_quality(data: Path, target: Path, budget: int, tmp: Path, lines: list[str]) -> None:
    lines += ["## 2. `quality --classifier`: scoring throughput and memory", "",
              "| workers | documents/s (scoring pass) | whole command s | peak RSS MB |", "|---:|---:|---:|---:|"]
    for w in (1, 2):
        wall, _, rss, rep = dwm_select(data, tmp / f"q{w}.parquet", "--method", "quality", "--classifier",
                                       "--budget-tokens", str(budget), "--target", str(target), workers=w)
        lines.append(f"| {w} | {rep['settings']['docs_per_second']:,.0f} | {wall:.1f} | {rss:.0f} |")
    lines.append("")


# ------------------------------------------------------------------------------------------ 3. memory
def bench_memory(data: Path, target: Path, tmp: Path, lines: list[str]) -> None:
    from dwm.selection.pool import Pool

    lines += ["## 3. Peak RSS (MB) at two pool sizes", "",
              "| method | small pool | large pool | small MB | large MB | large / small |", "|---|---|---|---:|---:|---:|"]
    pools = {f: sub_pool(data, tmp / f"pool{int(f * 100)}", f) for f in (0.25, 1.0)}
    run_dir = tiny_run(pools[0.25], tmp / "tiny-lm")
    small_ppl = {f: sub_pool(data, tmp / f"ppl{f * 100:g}", f) for f in (0.005, 0.02)}
    cases = [("random", pools, ["--method", "random"]),
             ("dsir", pools, ["--method", "dsir", "--target", str(target)]),
             ("quality --classifier", pools, ["--method", "quality", "--classifier", "--target", str(target)]),
             ("perplexity (tiny LM)", small_ppl, ["--method", "perplexity", "--ref-model", str(run_dir)])]
    for name, ps, args in cases:
        rss, desc = [], []
        for p in ps.values():
            pool = Pool(p)
            budget = pool.total_tokens // 10
            _, _, r, _ = dwm_select(p, tmp / "m.parquet", *args, "--budget-tokens", str(budget))
            rss.append(r)
            desc.append(f"{pool.total_tokens / 1e6:.1f}M tokens")
        lines.append(f"| {name} | {desc[0]} | {desc[1]} | {rss[0]:.0f} | {rss[1]:.0f} | {rss[1] / rss[0]:.2f} |")
    lines.append("")


def tiny_run(data: Path, out: Path) -> Path:
    cmd = [PY, "-m", "dwm.cli", "train", "--data", str(data), "--out", str(out), "model.spec=tiny",
           "train.max_steps=2", "train.global_batch_tokens=2048", "train.micro_batch_size=8", "log.progress=false",
           "train.device=cpu", "checkpoint.every=0"]
    if child(cmd)[3] != 0:
        raise SystemExit("tiny run failed")
    return out


# ------------------------------------------------------------------------------------------ 4. influence
def bench_influence(data: Path, target: Path, tmp: Path, steps: int, lines: list[str],
                    batch_tokens: int = 4096) -> None:
    from dwm.metrics import read_metrics

    base = [PY, "-m", "dwm.cli", "train", "--config", "cpu-small-uniform", "--data", str(data), "--out", "{out}",
            f"train.max_steps={steps}", f"train.global_batch_tokens={batch_tokens}", "log.progress=false",
            "train.device=cpu", "checkpoint.every=0", "log.every=1"]
    env = {"OMP_NUM_THREADS": "2"}
    res = {}
    for name, extra in (("uniform", []), ("influence", ["selector.mode=influence", "selector.every=10",
                                                        "selector.candidates=2", f"influence.reference={target}"])):
        out = tmp / f"run-{name}"
        wall, cpu, rss, rc = child([str(out) if a == "{out}" else a for a in base] + extra, env)
        if rc != 0:
            raise SystemExit(f"{name} run failed")
        recs = list(read_metrics(out / "metrics.jsonl"))
        res[name] = (wall, cpu, rss, recs)
    (uw, uc, ur, _), (iw, ic, ir, recs) = res["uniform"], res["influence"]
    infl = [r for r in recs if r.get("event") == "influence"]
    sel_s = sum(r["seconds"] for r in infl)
    tok = [r["tokens_seen"] for r in recs if "tokens_seen" in r][-1]
    corr = [r["model_corr"] for r in infl if r.get("model_corr") == r.get("model_corr")]
    lines += ["## 4. `influence` (online, MATES-style): a whole run against uniform", "",
              (f"- cpu-small, {steps} steps, {tok:,} training tokens each (the same budget); selector.every 10, "
              "candidates 2 (keep half), probe 25% of the candidates exactly (2 no-grad forwards each), the rest by "
              "the ridge influence model"), "",
              "| run | wall s | CPU s | peak RSS MB |", "|---|---:|---:|---:|",
              f"| uniform | {uw:.1f} | {uc:.1f} | {ur:.0f} |", f"| influence | {iw:.1f} | {ic:.1f} | {ir:.0f} |", "",
              f"- whole-run cost influence / uniform: **{iw / uw:.2f}x** wall, {ic / max(uc, 1e-9):.2f}x CPU",
              (f"- re-selections: {len(infl)} (every 10 steps), {sum(r['probed'] for r in infl):,} of "
              f"{sum(r['candidates'] for r in infl):,} candidates probed; {sel_s:.1f} s in selection "
              f"({sel_s / iw:.0%} of the run)"),
              f"- influence model: mean correlation with the next round's probes {np.mean(corr):.2f} "
              f"({len(corr)} rounds)" if corr else "- influence model: no second round to check", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "corpus-build" / "prepared-full"))
    ap.add_argument("--target", default=str(ROOT / "data" / "target" / "reference.jsonl"))
    ap.add_argument("--budget-share", type=float, default=0.1, help="budget as a share of the pool's tokens")
    ap.add_argument("--skip-package", action="store_true")
    ap.add_argument("--influence-steps", type=int, default=40)
    ap.add_argument("--only", default="dsir,quality,memory,influence")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "select.md"))
    args = ap.parse_args()
    from dwm.selection.pool import Pool

    data, target = Path(args.data), Path(args.target)
    budget = int(Pool(data).total_tokens * args.budget_share)
    lines = ["# `dwm select` benchmark", "",
             (f"- machine: {platform.machine()}, {os.cpu_count()} CPUs visible (shared with other jobs: load average "
             f"{os.getloadavg()[0]:.1f} at the start), python {platform.python_version()}"), ""]
    only = set(args.only.split(","))
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="bench-select-") as t:
        tmp = Path(t)
        for name, fn in (("dsir", lambda: bench_dsir(data, target, budget, tmp, args.skip_package, lines)),
                         ("quality", lambda: bench_quality(data, target, budget, tmp, lines)),
                         ("memory", lambda: bench_memory(data, target, tmp, lines)),
                         ("influence", lambda: bench_influence(data, target, tmp, args.influence_steps, lines))):
            if name in only:
                fn()
                out.write_text("\n".join(lines) + "\n")  # what is measured so far survives an interrupted run
    lines.append(f"- load average at the end: {os.getloadavg()[0]:.1f}")
    text = "\n".join(lines) + "\n"
    print(text)
    out.write_text(text)


if __name__ == "__main__":
    main()
