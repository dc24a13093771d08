"""Benchmark sharded `dwm prepare` and pools (prints a markdown section; not a test).

A synthetic SlimPajama-shaped input (train/chunkK/example_train_J.jsonl.zst, the set name at
meta.redpajama_set_name, 7 sets) of --shards x --mb-per-shard MB of text is prepared as --shards shards (`--shard
i/N`; shard 0 trains the BPE, the others take its tokenizer.json), each in its own child process. Then pools of the
first 1, 2, 4, ... shards are made (`dwm prepare --pool`), and for each a fresh child process opens the pool with
PreparedData and reads --batches random batches of --batch-size rows (`PreparedData.batch`, what the trainer
calls). Every child's memory comes from the kernel: peak RSS (ru_maxrss from wait4, and VmHWM), and at the end of
the read RssAnon (the process's own memory) and RssFile (pages of the mapped .bin files it touched: page cache,
shared and reclaimable, bounded by the rows read). The pool grows with the shard count; the point is that the
process's own memory does not.

    .venv/bin/python benchmarks/bench_pool.py [--shards 8] [--mb-per-shard 4] [--batches 4000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import git_commit  # benchmarks/ is sys.path[0] when a script runs

SETS = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook", "RedPajamaArXiv",
        "RedPajamaWikipedia", "RedPajamaStackExchange"]
SHARE = [0.52, 0.27, 0.05, 0.04, 0.05, 0.04, 0.03]  # about SlimPajama's token shares
ROOT = Path(__file__).resolve().parents[1]


def make_input(root: Path, n_files: int, mb_per_file: float, seed: int = 0) -> float:
    """n_files files of ~mb_per_file MB of text each, spread over chunk1..chunk10 as SlimPajama's; returns MB."""
    import zstandard

    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "se", "vo", "pi", "da", "ge", "hu", "xo", "ze", "bi", "fa"]
    vocab = {s: ["".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(400)] for s in SETS}
    total = 0
    for j in range(n_files):
        lines, size = [], 0
        while size < mb_per_file * 1e6:
            s = SETS[rng.choice(len(SETS), p=SHARE)]
            text = " ".join(rng.choice(vocab[s], size=int(rng.integers(50, 1500))))
            lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": s}}))
            size += len(text)
        p = root / f"chunk{j % 10 + 1}" / f"example_train_{j // 10}.jsonl.zst"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(zstandard.ZstdCompressor(level=3).compress(("\n".join(lines) + "\n").encode()))
        total += size
    return total / 1e6


READ = r"""
import json, resource, sys, time
import numpy as np
import torch  # imported before the baseline: PreparedData.batch makes tensors
from dwm.data.dataset import PreparedData
def status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            d[k] = int(v.split()[0]) * 1024
    return d
def bin_rss():  # resident pages of the mapped .bin files (from smaps)
    total, on = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:
            on = line.rstrip().endswith(".bin")
        elif on and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total
base = status()
t = time.perf_counter()
data = PreparedData(sys.argv[1], "train")
opened = time.perf_counter() - t
rng = np.random.default_rng(0)
n, B, bs = len(data), int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
checksum = 0
for _ in range(B):
    b = data.batch(rng.integers(0, n, size=bs))
    checksum += int(b.input_ids[:, 0].sum())
read = time.perf_counter() - t
print(json.dumps({"rows": n, "base": base, "end": status(), "bin_rss": bin_rss(), "open_s": opened, "read_s": read,
                  "domains": len(data.domains), "checksum": checksum}))
"""


def run_with_wait4(argv: list[str]) -> tuple[float, int, str]:
    """Like child(), but the peak RSS is the child's own (wait4 on its pid)."""
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: exec with stdout to the pipe
        os.close(r)
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.execve(argv[0], argv, env)
    os.close(w)
    chunks = []
    while True:
        block = os.read(r, 1 << 16)
        if not block:
            break
        chunks.append(block)
    os.close(r)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"child failed ({os.waitstatus_to_exitcode(status)}): {' '.join(argv)}")
    return time.perf_counter() - t, usage.ru_maxrss * 1024, b"".join(chunks).decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--mb-per-shard", type=float, default=4.0, help="MB of text per shard")
    ap.add_argument("--files-per-shard", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--workdir", default=None, help="keep the inputs and shards here (default: a temp dir)")
    args = ap.parse_args()
    py = sys.executable
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-pool-"))
    work.mkdir(parents=True, exist_ok=True)
    n_files = args.shards * args.files_per_shard
    inp = work / "train"
    shutil.rmtree(inp, ignore_errors=True)
    mb = make_input(inp, n_files, args.mb_per_shard / args.files_per_shard)
    common = ["--domain-field", "meta.redpajama_set_name", "--seq-len", str(args.seq_len), "--workers", "1",
              "--val-fraction", "0.01", "--no-progress", "--force"]
    prep = []
    for i in range(args.shards):
        tok = ([] if i == 0 else ["--tokenizer", str(work / "shard0" / "tokenizer.json")])
        extra = ["--vocab-size", str(args.vocab_size), "--tokenizer-sample-mb", "2"] if i == 0 else []
        sec, rss, _ = run_with_wait4([py, "-m", "dwm", "prepare", str(inp), "--out", str(work / f"shard{i}"),
                                      "--shard", f"{i}/{args.shards}", *common, *tok, *extra])
        m = json.loads((work / f"shard{i}" / "meta.json").read_text())
        prep.append((i, sec, rss, m["splits"]["train"]["n_samples"], len(m["domains"])))
    counts = [k for k in (1, 2, 4, 8, 16, 32) if k <= args.shards]
    rows = []
    for k in counts:
        pool = work / f"pool{k}"
        shutil.rmtree(pool, ignore_errors=True)
        psec, prss, _ = run_with_wait4([py, "-m", "dwm", "prepare", "--pool", "--out", str(pool),
                                        *[str(work / f"shard{i}") for i in range(k)]])
        sec, rss, out = run_with_wait4([py, "-c", READ, str(pool), str(args.batches), str(args.batch_size)])
        r = json.loads(out)
        bin_mb = sum((work / f"shard{i}" / "train.bin").stat().st_size for i in range(k)) / 1e6
        rows.append((k, r, rss, bin_mb, psec, prss))
    commit = git_commit()
    cmd = "python benchmarks/bench_pool.py " + " ".join(sys.argv[1:])
    MB = 1 << 20
    print(f"## Sharded prepare and pools: memory as the pool grows ({time.strftime('%Y-%m-%d', time.gmtime())}, "
          f"commit {commit})\n")
    print(f"- command: `{cmd}`")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs visible (shared with other jobs), python "
          f"{platform.python_version()}; measured (child processes, kernel counters)")
    print(f"- input: synthetic SlimPajama-shaped, {n_files} files train/chunkK/example_train_J.jsonl.zst, "
          f"{mb:.1f} MB of text, 7 set names at meta.redpajama_set_name; `--shard i/{args.shards}`, seq_len "
          f"{args.seq_len}, BPE vocab {args.vocab_size} trained by shard 0\n")
    print("| shard | prepare s | peak RSS MB | train rows | domains |")
    print("|---:|---:|---:|---:|---:|")
    for i, sec, rss, n, d in prep:
        print(f"| {i}{' (trains the BPE)' if i == 0 else ''} | {sec:.1f} | {rss / MB:.0f} | {n:,} | {d} |")
    print(f"\nOpen the pool (PreparedData) and read {args.batches:,} random batches of {args.batch_size} rows "
          "(`.batch`), fresh process each; `dwm prepare --pool` itself alongside:\n")
    print("| shards in pool | train rows | .bin MB | open s | read s | peak RSS MB (wait4) | RSS after imports MB "
          "| peak - imports MB | RssAnon after imports -> end MB | .bin pages resident at end MB "
          "| `--pool`: s / peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, r, rss, bin_mb, psec, prss in rows:
        base = r["base"]["VmRSS"]
        print(f"| {k} | {r['rows']:,} | {bin_mb:.1f} | {r['open_s']:.2f} | {r['read_s']:.2f} | {rss / MB:.0f} | "
              f"{base / MB:.0f} | {(rss - base) / MB:.0f} | {r['base']['RssAnon'] / MB:.0f} -> "
              f"{r['end']['RssAnon'] / MB:.0f} | {r['bin_rss'] / MB:.1f} | {psec:.1f} / {prss / MB:.0f} |")


if __name__ == "__main__":
    main()
