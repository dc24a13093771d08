"""Benchmark `dwm prepare` (prints a table; not a test).

1. Throughput on the shipped corpus: `prepare()` with 1 and 2 workers vs the bare `tokenizers` loop
   (Tokenizer.encode_batch over the same document texts, already in memory, in chunks) in the same run.
   Both use the same tokenizer (trained once first, its training time reported apart), so the ratio
   ours/bare is the cost of reading, validating, splitting, packing and writing. Goal: >= 0.8 with 1 worker.
2. Peak RSS of a `dwm prepare` child process (ru_maxrss from wait4) on the full ~150 MB corpus, tokenizer
   training included (the default path). Goal: < 1 GB. When corpus-build/full is smaller than --rss-mb, a
   corpus of about --rss-mb is made by replicating it (documents get new ids), and the table says so.

    .venv/bin/python benchmarks/bench_prepare.py [--corpus data/corpus] [--full corpus-build/full]
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
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tokenizers import Tokenizer

from dwm.data.prepare import PrepareOptions, prepare
from dwm.data.readers import ReadOptions, SkipCounter, expand_inputs, iter_documents

ROOT = Path(__file__).resolve().parents[1]


def corpus_files(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*.jsonl*") if p.is_file()) if d.is_dir() else []


def mb_of(files: list[Path]) -> float:
    return sum(f.stat().st_size for f in files) / 1e6


def bare_loop(tok_path: Path, texts: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of the bare encode_batch loop (fresh tokenizer, chunks of 1000 documents)."""
    tok = Tokenizer.from_file(str(tok_path))
    c, t = time.process_time(), time.perf_counter()
    for i in range(0, len(texts), 1000):
        tok.encode_batch(texts[i:i + 1000], add_special_tokens=False)
    return time.perf_counter() - t, time.process_time() - c


def subset(files: list[Path], max_mb: float, d: Path) -> list[Path]:
    """The first max_mb/len(files) MB of text of each file, as <same name>.jsonl (a stable throughput set)."""
    share = max_mb * 1e6 / len(files)
    out = []
    for s in expand_inputs(files)[0]:
        p = d / f"{s.domain}__{s.source}.jsonl"
        n = 0
        with open(p, "w") as f:
            for doc in iter_documents(s, ReadOptions(), SkipCounter()):
                f.write(json.dumps({"id": doc.doc_id, "text": doc.text}) + "\n")
                n += doc.n_bytes
                if n >= share:
                    break
        out.append(p)
    return out


def replicate(files: list[Path], target_mb: float, d: Path) -> list[Path]:
    """A ~target_mb (uncompressed text) corpus: each source's documents repeated with new ids."""
    import zstandard

    counter = SkipCounter()
    sources, _ = expand_inputs(files)
    per_src = [[(doc.doc_id, doc.text) for doc in iter_documents(s, ReadOptions(), counter)] for s in sources]
    text_mb = sum(len(t.encode()) for docs in per_src for _, t in docs) / 1e6
    k = max(1, round(target_mb / max(text_mb, 1e-9)))
    out = []
    for s, docs in zip(sources, per_src):
        p = d / f"{s.domain}__{s.source}_x{k}.jsonl.zst"
        with open(p, "wb") as raw, zstandard.ZstdCompressor(level=1).stream_writer(raw) as w:
            for r in range(k):
                for doc_id, text in docs:
                    w.write((json.dumps({"id": f"{doc_id}#{r}", "text": text}) + "\n").encode())
        out.append(p)
    return out


def rss_run(files: list[Path], out: Path, workers: int, vocab: int, seq_len: int) -> tuple[float, float, dict]:
    """Run `dwm prepare` in a child process; return (peak RSS MB, seconds, stats.json)."""
    cmd = [sys.executable, "-m", "dwm.cli", "prepare", *map(str, files), "--out", str(out), "--force",
           "--workers", str(workers), "--vocab-size", str(vocab), "--seq-len", str(seq_len), "--no-progress"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd)
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted: do not leave the child running
        proc.kill()
        raise
    secs = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prepare child failed: {cmd}")
    return ru.ru_maxrss / 1024, secs, json.loads((out / "stats.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    ap.add_argument("--full", type=Path, default=ROOT / "corpus-build" / "full")
    ap.add_argument("--rss-mb", type=float, default=150.0, help="size of the RSS corpus when full is smaller")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out-md", type=Path, default=ROOT / "benchmarks" / "results" / "prepare.md")
    ap.add_argument("--tp-mb", type=float, default=8.0, help="text used for the throughput comparison")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true", help="keep that section of --out-md, redo RSS")
    a = ap.parse_args()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup (temp dir, child) on kill

    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    shipped = corpus_files(a.corpus)
    note = ""
    if not shipped:
        shipped = corpus_files(a.full)
        note = f" ({a.corpus} is empty: used {a.full} instead)"
    if not shipped:
        raise SystemExit(f"no corpus in {a.corpus} or {a.full}")
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        if a.skip_throughput:
            kept = a.out_md.read_text().split("\n## Peak RSS")[0].rstrip("\n").splitlines() \
                if a.out_md.is_file() else ["# `dwm prepare` benchmark"]
            lines.extend(kept)
            print("\n".join(kept))
        else:
            throughput(a, shipped, note, work, say)
        if not a.skip_rss:
            rss_section(a, shipped, work, say)
        a.out_md.parent.mkdir(parents=True, exist_ok=True)
        a.out_md.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {a.out_md}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def throughput(a: argparse.Namespace, shipped: list[Path], note: str, work: Path, say) -> None:
    """Section 1: prepare vs the bare tokenizers loop, 1 and 2 workers."""
    say("# `dwm prepare` benchmark")
    say()
    say(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs visible (shared with other jobs), "
        f"python {platform.python_version()}")
    say(f"- corpus: {len(shipped)} files, {mb_of(shipped):.1f} MB compressed{note}")
    (work / "tp").mkdir()
    tp_files = subset(shipped, a.tp_mb, work / "tp")
    say(f"- throughput set: the first {a.tp_mb / len(shipped):.2f} MB of text of each file")
    # tokenizer, trained once (the default path of prepare), then reused by every timed run
    t = time.perf_counter()
    prepare(tp_files, work / "tok", PrepareOptions(vocab_size=a.vocab_size, seq_len=a.seq_len, workers=1,
                                                  progress=False))
    t_first = time.perf_counter() - t
    tok_path = work / "tok" / "tokenizer.json"
    counter = SkipCounter()
    texts = [d.text for s in expand_inputs(tp_files)[0] for d in iter_documents(s, ReadOptions(), counter)]
    text_mb = sum(len(x.encode()) for x in texts) / 1e6
    say(f"- text: {len(texts):,} documents, {text_mb:.1f} MB of UTF-8; vocab {a.vocab_size}, "
        f"seq_len {a.seq_len}")
    say(f"- first prepare incl. BPE training (1 worker): {t_first:.1f} s")
    say(f"- each run repeated {a.rounds}x, interleaved; best (minimum) time kept. CPU = process time of this "
        "process (robust to other jobs on the shared machine; meaningless for 2 threads), wall = elapsed")
    say()
    say("| run | wall s | wall MB/s | CPU s | CPU MB/s | cores used (CPU/wall) | ratio ours/bare (wall) "
        "| ratio (CPU) |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|")
    runs: dict[str, list[tuple[float, float]]] = {"bare": [], "w1": [], "w2": []}
    for _ in range(a.rounds):
        runs["bare"].append(bare_loop(tok_path, texts))
        for w in (1, 2):
            c, t = time.process_time(), time.perf_counter()
            prepare(tp_files, work / f"w{w}", PrepareOptions(tokenizer=str(tok_path), seq_len=a.seq_len,
                                                             workers=w, progress=False, force=True))
            runs[f"w{w}"].append((time.perf_counter() - t, time.process_time() - c))
    best = {k: (min(r[0] for r in v), min(r[1] for r in v)) for k, v in runs.items()}
    bw, bc = best["bare"]
    names = {"bare": "bare `Tokenizer.encode_batch` loop, 1 thread", "w1": "`prepare`, 1 worker",
             "w2": "`prepare`, 2 workers"}
    for k, (w_, c_) in best.items():
        cpu_ratio = f"{bc / c_:.2f}" if k != "w2" else "n/a"
        say(f"| {names[k]} | {w_:.2f} | {text_mb / w_:.2f} | {c_:.2f} | {text_mb / c_:.2f} | {c_ / w_:.2f} | "
            f"{bw / w_:.2f} | {cpu_ratio} |")
    same = all((work / "w1" / f).read_bytes() == (work / "w2" / f).read_bytes()
               for f in ("train.bin", "val.bin", "train.parquet", "val.parquet"))
    say()
    say(f"- scaling 1 -> 2 workers (wall): {best['w1'][0] / best['w2'][0]:.2f}x; outputs byte-identical: {same}")
    say(f"- ours/bare with 1 worker: {bw / best['w1'][0]:.2f} wall, {bc / best['w1'][1]:.2f} CPU (goal >= 0.8)")
    say("- all wall times (s): " + "; ".join(f"{k}: " + ", ".join(f"{r[0]:.2f}" for r in v)
                                            for k, v in runs.items()))


def rss_section(a: argparse.Namespace, shipped: list[Path], work: Path, say) -> None:
    """Section 2: peak RSS of a prepare child on the full corpus (or a synthetic one of --rss-mb)."""
    full = corpus_files(a.full)
    full_mb = mb_of(full)
    say()
    if full:  # a snapshot: the corpus builder may rewrite its files while this runs
        (work / "full").mkdir()
        full = [Path(shutil.copy2(f, work / "full" / f.name)) for f in full]
        rss_files, what = full, f"the full corpus {a.full} ({len(full)} files, {full_mb:.1f} MB compressed)"
    else:
        rss_files = replicate(shipped, a.rss_mb, work)
        what = f"SYNTHETIC: the {len(shipped)} files of {a.corpus} replicated to ~{a.rss_mb:.0f} MB of text " \
               f"({a.full} was absent)"
    say(f"## Peak RSS of `dwm prepare` (child process, ru_maxrss) on {what}")
    say()
    say("| workers | text MB | docs | tokens | seconds | MB/s | peak RSS MB |")
    say("|---:|---:|---:|---:|---:|---:|---:|")
    w = 2
    rss, secs, st = rss_run(rss_files, work / "rss", w, a.vocab_size, a.seq_len)
    say(f"| {w} | {st['bytes'] / 1e6:.1f} | {st['docs_written']:,} | {st['tokens']:,} | {secs:.1f} | "
        f"{st['bytes'] / 1e6 / secs:.2f} | {rss:.0f} |")
    say()
    say(f"- includes BPE training on a 32 MB sample, interpreter start and imports; goal < 1024 MB: "
        f"{'met' if rss < 1024 else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
