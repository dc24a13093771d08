"""Benchmark: `dwm prepare` on ONE very long document (prints a table; not a test).

Builds a single-record jsonl whose text is the shipped corpus' documents joined with blank lines until it reaches
--mb MB, then runs `dwm prepare` on it in a child process twice and reports wall time and peak RSS (ru_maxrss of
the child, from wait4): with an 8k BPE tokenizer given (`--tokenizer`, trained beforehand on the shipped corpus,
its time not counted; 16 MB of it), and with the default path that also trains the BPE (vocab 8192) on the document itself.
Goal: peak RSS <= 1 GB on a 50 MB document.

    .venv/bin/python benchmarks/bench_long_doc.py [--mb 50] [--corpus data/corpus] [--workdir DIR]
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

ROOT = Path(__file__).resolve().parents[1]


def corpus_texts(d: Path):
    from dwm.data.readers import ReadOptions, SkipCounter, expand_inputs, iter_documents

    sources, _ = expand_inputs([d])
    for src in sources:
        for doc in iter_documents(src, ReadOptions(), SkipCounter()):
            yield doc.text


def take_mb(texts, mb: float):
    n = 0
    for t in texts:
        yield t
        n += len(t.encode())
        if n >= mb * 1e6:
            return


def run_child(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB, return code) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        print(err[-2000:], file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dwm-longdoc-"))
    work.mkdir(parents=True, exist_ok=True)
    from dwm.data.tokenizer import train_bpe

    want = int(args.mb * 1e6)
    parts, size = [], 0
    for t in corpus_texts(Path(args.corpus)):
        parts.append(t)
        size += len(t.encode())
        if size >= want:
            break
    reps = 1
    while size < want:  # the corpus is smaller than asked: repeat it
        parts, size, reps = parts + parts, size * 2, reps * 2
    text = "\n\n".join(parts)
    text = text[: len(text) * want // max(1, len(text.encode()))]
    doc = work / "web__long.jsonl"
    doc.write_text(json.dumps({"id": "long", "text": text}) + "\n")
    n_bytes = len(text.encode())
    del parts, text
    t0 = time.perf_counter()
    tok = train_bpe(take_mb(corpus_texts(Path(args.corpus)), 16), 8192)
    tok.save(str(work / "tok8k.json"))
    t_tok = time.perf_counter() - t0
    base = [sys.executable, "-m", "dwm", "prepare", str(doc), "--no-progress", "--workers", "1",
            "--val-fraction", "0"]
    rows = []
    for name, extra in (("--tokenizer tok8k.json (vocab 8192)", ["--tokenizer", str(work / "tok8k.json")]),
                        ("BPE trained on the document (vocab 8192)", ["--vocab-size", "8192"])):
        out = work / f"out{len(rows)}"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, rc = run_child([*base, *extra, "--out", str(out)])
        meta = json.loads((out / "meta.json").read_text()) if rc == 0 else {}
        rows.append((name, wall, rss, rc, meta.get("splits", {}).get("train", {}).get("n_samples")))
    print(f"- machine: {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs visible, python "
          f"{platform.python_version()}; measured (child processes, ru_maxrss)")
    print(f"- input: one jsonl record, {n_bytes / 1e6:.1f} MB of UTF-8 text (the shipped corpus' documents joined"
          f"{f', repeated {reps}x' if reps > 1 else ''}); seq_len 256, 1 worker; 8k tokenizer trained apart (16 MB of the corpus) in "
          f"{t_tok:.1f} s")
    print()
    print("| tokenizer | seconds | peak RSS MB | train rows | rc |")
    print("|---|---:|---:|---:|---:|")
    for name, wall, rss, rc, n in rows:
        print(f"| {name} | {wall:.1f} | {rss:.0f} | {n if n is not None else '-'} | {rc} |")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
