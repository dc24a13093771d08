"""SlimPajama as it ships: `train/chunkK/example_train_N.jsonl.zst` with the set name at meta.redpajama_set_name.
Domains from the nested field, skips and the all-missing error, sharded prepare, and a pool of shards read as one
data set (PreparedData, `dwm train`, `dwm select`) against the unsharded prepare as the reference."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zstandard

from dwm.cli import main
from dwm.data import tokenizer as tkz
from dwm.data.dataset import ConcatRows, PreparedData, data_fingerprint, read_rows
from dwm.errors import UserError

SETS = {"RedPajamaCommonCrawl": 14, "RedPajamaC4": 9, "RedPajamaGithub": 5, "RedPajamaBook": 2,
        "RedPajamaArXiv": 3, "RedPajamaWikipedia": 4, "RedPajamaStackExchange": 6}  # documents of each set
WORDS = {s: [f"{s[10:].lower()}{k}" for k in range(6)] + ["the", "of", "and", "data", "model"] for s in SETS}
FILES = [f"chunk{c}/example_train_{j}.jsonl.zst" for c in (1, 2, 3) for j in (0, 1)]
N_MISSING = 3  # records of chunk2/example_train_1 without meta.redpajama_set_name
FIELD = "meta.redpajama_set_name"


def write_zst(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in recs).encode()))


@pytest.fixture(scope="module")
def slimpajama(tmp_path_factory) -> Path:
    """SlimPajama-shaped: train/chunk{1,2,3}/example_train_{0,1}.jsonl.zst, every set name, the documents of each
    set dealt round robin over the six files, and three records without the set name."""
    root = tmp_path_factory.mktemp("slimpajama") / "train"
    rng = random.Random(0)
    names = [s for s, n in SETS.items() for _ in range(n)]
    rng.shuffle(names)
    recs: dict[str, list[dict]] = {f: [] for f in FILES}
    for i, s in enumerate(names):
        text = " ".join(rng.choice(WORDS[s]) for _ in range(rng.randint(5, 60)))
        recs[FILES[i % len(FILES)]].append({"text": text, "meta": {"redpajama_set_name": s}})
    for k in range(N_MISSING):
        recs["chunk2/example_train_1.jsonl.zst"].insert(k, {"text": f"no set name {k}", "meta": {"other": 1}})
    for f, r in recs.items():
        write_zst(root / f, r)
    return root


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    tok = tkz.train_bpe([" ".join(w) for w in WORDS.values()] * 20, 300)
    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(p))
    return p


def prepare(inputs, out, *args) -> int:
    return main(["prepare", *map(str, inputs), "--out", str(out), "--seq-len", "16", "--val-fraction", "0.2",
                 "--workers", "1", "--no-progress", *map(str, args)])


def rows_by_source(data: PreparedData) -> dict[str, list[tuple]]:
    """source -> [(doc_id, domain, n_tokens, row tokens)] in row order: what a prepare wrote, order-free between
    sources (a shard never cuts a source)."""
    t = data.table.to_pydict()
    out: dict[str, list[tuple]] = {}
    for i in range(len(data)):
        out.setdefault(t["source"][i], []).append(
            (t["doc_id"][i], t["domain"][i], t["n_tokens"][i], np.asarray(data.tokens[i]).tobytes()))
    return out


def test_domains_from_the_nested_set_name(slimpajama, tok_path, tmp_path):
    out = tmp_path / "sp"
    assert prepare([slimpajama], out, "--domain-field", FIELD, "--tokenizer", tok_path, "--packing", "doc") == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["domains"] == sorted(SETS)
    # input directories are walked recursively; same-named files of different chunks stay distinct sources
    assert meta["sources"] == sorted(f[: -len(".jsonl.zst")] for f in FILES)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == {"missing_domain": N_MISSING}
    assert stats["docs_in"] == sum(SETS.values()) + N_MISSING and stats["docs_written"] == sum(SETS.values())
    assert {d: v["docs"] for d, v in stats["per_domain"].items()} == SETS
    # the parquet column: every written document (its first row, packing doc) under its set name
    docs: Counter = Counter()
    for split in ("train", "val"):
        t = pq.read_table(out / f"{split}.parquet").to_pydict()
        assert set(t["domain"]) <= set(SETS)
        firsts = {(d, s) for d, s in zip(t["doc_id"], t["domain"])}
        docs.update(s for _, s in firsts)
    assert dict(docs) == SETS


def test_a_misspelt_field_stops_with_one_line_and_a_hint(slimpajama, tok_path, tmp_path, capsys):
    rc = prepare([slimpajama], tmp_path / "sp", "--domain-field", "meta.redpajama_setname", "--tokenizer", tok_path)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"dwm prepare: error: {slimpajama / FILES[0]}: --domain-field 'meta.redpajama_setname' is "
                          "missing in all ")
    assert err.rstrip().endswith("(fields found: text, meta, meta.redpajama_set_name) "
                                 "(did you mean meta.redpajama_set_name?)")
    assert not (tmp_path / "sp" / "meta.json").exists()


def test_shards_pooled_equal_the_unsharded_prepare(slimpajama, tok_path, tmp_path):
    common = ["--domain-field", FIELD, "--tokenizer", tok_path]
    assert prepare([slimpajama], tmp_path / "whole", *common) == 0
    n = 4
    shards = [tmp_path / f"shard{i}" for i in range(n)]
    for i, d in enumerate(shards):
        assert prepare([slimpajama], d, *common, "--shard", f"{i}/{n}") == 0
    # round robin over the sorted files: shard i holds files i, i + n, ...
    ordered = sorted(f[: -len(".jsonl.zst")] for f in FILES)
    for i, d in enumerate(shards):
        m = json.loads((d / "meta.json").read_text())
        assert m["sources"] == sorted(ordered[i::n]) and m["shard"] == {"index": i, "count": n,
                                                                         "n_sources": len(ordered[i::n])}
    assert main(["prepare", "--pool", "--out", str(tmp_path / "pool"), *map(str, shards)]) == 0
    whole = json.loads((tmp_path / "whole" / "meta.json").read_text())
    pm = json.loads((tmp_path / "pool" / "meta.json").read_text())
    assert pm["domains"] == whole["domains"] == sorted(SETS) and pm["splits"] == whole["splits"]
    assert (tmp_path / "pool" / "tokenizer.json").read_bytes() == (shards[0] / "tokenizer.json").read_bytes()
    pstats = json.loads((tmp_path / "pool" / "stats.json").read_text())
    assert pstats["skipped"] == {"missing_domain": N_MISSING} and pstats["per_domain"] == json.loads(
        (tmp_path / "whole" / "stats.json").read_text())["per_domain"]
    for split in ("train", "val"):
        ref, pool = PreparedData(tmp_path / "whole", split), PreparedData(tmp_path / "pool", split)
        parts = [PreparedData(d, split) for d in shards]
        assert len(pool) == sum(len(p) for p in parts) == len(ref)
        assert rows_by_source(pool) == rows_by_source(ref)
        # rows and domain ids: the shards one after the other, ids remapped to the pool's sorted domain list
        cat = np.concatenate([np.asarray(p.tokens[np.arange(len(p))]) for p in parts])
        assert np.array_equal(pool.tokens[np.arange(len(pool))], cat)
        names = [p.domains[i] for p in parts for i in p.domain_ids]
        assert [pool.domains[i] for i in pool.domain_ids] == names
        assert pool.table["sample_id"].to_pylist() == list(range(len(pool)))
        assert np.array_equal(read_rows(tmp_path / "pool", split, 3, len(pool) - 2), cat[3:len(pool) - 2])
        b = pool.batch([len(pool) - 1, 0, len(parts[0])])
        assert b.input_ids.tolist() == cat[[len(pool) - 1, 0, len(parts[0])]].astype(np.int64).tolist()
        assert b.domain_ids.tolist() == [pool.domains.index(names[i]) for i in (len(pool) - 1, 0, len(parts[0]))]
    # the fingerprint: stable, not any shard's, and the order of the shards counts
    fp = data_fingerprint(tmp_path / "pool")
    assert fp == data_fingerprint(tmp_path / "pool") and fp not in {data_fingerprint(d) for d in shards}
    assert main(["prepare", "--pool", "--out", str(tmp_path / "pool2"), *map(str, shards[::-1])]) == 0
    assert data_fingerprint(tmp_path / "pool2") != fp


def test_concat_rows_index_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 100, size=(k, 5)).astype(np.uint16) for k in (3, 0, 4, 2)]
    ref, rows = np.concatenate(parts), ConcatRows(parts)
    assert rows.shape == ref.shape and len(rows) == 9 and rows.dtype == np.uint16
    for key in (0, 4, -1, slice(None), slice(2, 8, 3), [8, 0, 3, 3], np.array([[1, 7], [2, 2]]), ref[:, 0] > 50,
                (5, slice(None, 3)), ([1, 6], slice(1, None)), (-2, 4)):
        assert np.array_equal(rows[key], ref[key]), key
    assert np.array_equal(np.asarray(rows), ref)
    with pytest.raises(IndexError):
        rows[9]
    with pytest.raises(IndexError):
        rows[[0, 10]]


def test_shard_and_pool_refusals(slimpajama, tok_path, tmp_path, capsys):
    def err(*argv) -> str:
        capsys.readouterr()
        rc = main(list(map(str, argv)))
        e = capsys.readouterr().err
        assert rc == 2 and e.count("\n") == 1, e
        return e

    base = ["prepare", slimpajama, "--domain-field", FIELD, "--seq-len", "16", "--workers", "1", "--no-progress",
            "--vocab-size", "300"]
    assert "needs --tokenizer" in err(*base, "--shard", "1/2", "--out", tmp_path / "s1")
    assert "want I/N" in err(*base, "--shard", "2", "--out", tmp_path / "s1")
    assert "0 <= I < N" in err(*base, "--shard", "2/2", "--out", tmp_path / "s1")
    assert "none for shard 6" in err(*base, "--shard", "6/7", "--tokenizer", tok_path, "--out", tmp_path / "s1")
    # shard 0 trains the BPE, shard 1 takes it: they pool; shard 1 trained separately does not
    assert main([*map(str, base), "--shard", "0/2", "--out", str(tmp_path / "s0")]) == 0
    assert main([*map(str, base), "--shard", "1/2", "--tokenizer", str(tmp_path / "s0" / "tokenizer.json"),
                 "--out", str(tmp_path / "s1")]) == 0
    assert main([*map(str, base), "--out", str(tmp_path / "other"), "--tokenizer", str(tok_path)]) == 0
    assert main(["prepare", "--pool", "--out", str(tmp_path / "pool"), str(tmp_path / "s0"),
                 str(tmp_path / "s1")]) == 0
    assert len(PreparedData(tmp_path / "pool")) == len(PreparedData(tmp_path / "s0")) + len(
        PreparedData(tmp_path / "s1"))
    e = err("prepare", "--pool", "--out", tmp_path / "p2", tmp_path / "s0", tmp_path / "other")
    assert "other/tokenizer.json differs from" in e
    assert main([*map(str, base), "--shard", "1/2", "--tokenizer", str(tmp_path / "s0" / "tokenizer.json"),
                 "--seq-len", "24", "--out", str(tmp_path / "s1b")]) == 0
    assert "has seq_len 24 but" in err("prepare", "--pool", "--out", tmp_path / "p3", tmp_path / "s0",
                                       tmp_path / "s1b")
    assert "listed twice" in err("prepare", "--pool", "--out", tmp_path / "p4", tmp_path / "s0", tmp_path / "s0")
    assert "is itself a pool" in err("prepare", "--pool", "--out", tmp_path / "p5", tmp_path / "pool")
    assert "not a pool" in err("prepare", "--pool", "--out", tmp_path / "s1", tmp_path / "s0")
    (tmp_path / "file").write_text("x")
    assert "not a directory" in err("prepare", "--pool", "--out", tmp_path / "file", tmp_path / "s0")
    # a shard prepared again after pooling: the pool refuses to read it
    assert main([*map(str, base), "--shard", "1/2", "--tokenizer", str(tmp_path / "s0" / "tokenizer.json"),
                 "--val-fraction", "0.5", "--out", str(tmp_path / "s1")]) == 0
    capsys.readouterr()
    with pytest.raises(UserError, match="prepared again since the pool was made"):
        PreparedData(tmp_path / "pool")


@pytest.fixture(scope="module")
def pool_dir(slimpajama, tok_path, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sp-pool")
    common = ["--domain-field", FIELD, "--tokenizer", tok_path, "--packing", "doc"]
    for i in range(2):
        assert prepare([slimpajama], d / f"shard{i}", *common, "--shard", f"{i}/2") == 0
    assert main(["prepare", "--pool", "--out", str(d / "pool"), str(d / "shard0"), str(d / "shard1")]) == 0
    return d / "pool"


def test_dwm_train_and_select_read_a_pool(pool_dir, tmp_path):
    data = PreparedData(pool_dir)
    run = tmp_path / "run"
    rc = main(["train", "--data", str(pool_dir), "--out", str(run), "model.spec=tiny",
               "train.global_batch_tokens=128", "train.micro_batch_size=4", "train.max_steps=3", "log.every=1",
               "log.progress=false", "checkpoint.every=0", "optim.warmup_steps=1", "train.device=cpu",
               "data.shuffle=false"])
    assert rc == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in recs if "loss" in r]) == 3
    assert (run / "tokenizer.json").read_bytes() == data.tokenizer_path.read_bytes()
    # dwm target build --train POOL: the overlap check reads the shards' document ids (the last is shard 1's)
    from dwm.data.readers import Document
    from dwm.data.target import training_overlap

    docs = [Document("x", data.doc_ids[-1], "d", "s"), Document("y", "not-in-the-pool", "d", "s")]
    assert training_overlap(docs, [pool_dir]) == [data.doc_ids[-1]]
    assert data.doc_ids[-1].startswith("chunk")
    # dwm select: the pool's documents (rows of both shards), a manifest that dwm train accepts
    from dwm.selection.pool import Pool, shard_texts

    sel = Pool(pool_dir)
    assert sel.n_rows == len(data) and sel.domains == sorted(SETS)
    texts = [t for s in sel.shards(min_shards=3) for t in shard_texts(s)]
    assert len(texts) == len(sel) and sum(t.count("\n") for t in texts) == data.meta["splits"]["train"]["n_docs"]
    out = tmp_path / "sel.parquet"
    assert main(["select", "--data", str(pool_dir), "--method", "random", "--budget-tokens", "200", "--out", str(out),
                 "--workers", "1"]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["fingerprint"] == data_fingerprint(pool_dir)
    rc = main(["train", "--data", str(pool_dir), "--selection", str(out), "--out", str(tmp_path / "run2"),
               "model.spec=tiny", "train.global_batch_tokens=128", "train.micro_batch_size=4", "train.max_steps=1",
               "log.progress=false", "checkpoint.every=0", "train.device=cpu"])
    assert rc == 0


def test_a_row_domain_missing_from_meta_is_one_line(tmp_path):
    from dwm.testing import make_synthetic_prepared

    d = make_synthetic_prepared(tmp_path / "data", n_train=8, n_val=2, seq_len=16)
    data = PreparedData(d)
    assert [data.domains[i] for i in data.domain_ids] == data.table["domain"].to_pylist()
    assert data.doc_ids == data.table["doc_id"].to_pylist()
    meta = json.loads((d / "meta.json").read_text())
    dropped = meta["domains"].pop()
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"train.parquet: domain '{dropped}' not listed in meta.json domains"):
        PreparedData(d)
