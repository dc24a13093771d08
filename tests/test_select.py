"""`dwm select` and the selection methods on toy data: DSIR's importance weights by hand, a target-like domain
preferred by dsir, the trained classifier and the online influence selector, Gumbel top-k inclusion frequencies,
manifests into `dwm train`, the Ray engine against the local one, determinism, and one-line errors."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dwm.cli import main
from dwm.errors import UserError
from dwm.selection import dsir
from dwm.selection.pool import Pool, fill_budget, gumbel_keys, read_selection_info
from dwm.testing import _WORDS


@pytest.fixture(scope="session")
def pool_dir(tmp_path_factory):
    """160 documents (one row each) of two domains: a = 'the cat sat ...', b = 'market prices ...'."""
    from dwm.testing import make_synthetic_prepared

    return make_synthetic_prepared(tmp_path_factory.mktemp("pool") / "data", n_train=160, n_val=8, seq_len=32)


@pytest.fixture(scope="session")
def target_a(tmp_path_factory):
    """LAMBADA-format passages in domain a's words (the target-like domain)."""
    rng = np.random.default_rng(1)
    words = _WORDS[0].split()
    p = tmp_path_factory.mktemp("target") / "reference.jsonl"
    p.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, size=30))}) + "\n" for _ in range(40)))
    return p


def select(pool_dir, out, *args, method="dsir", budget=1200):
    return main(["select", "--data", str(pool_dir), "--method", method, "--budget-tokens", str(budget),
                 "--out", str(out), "--workers", "1", *args])


def manifest(path) -> tuple[list[int], list[float]]:
    t = pq.read_table(path)
    return t["sample_id"].to_pylist(), t["score"].to_pylist()


def domain_share(pool_dir, path, domain="a") -> float:
    rep = json.loads(Path(path).with_suffix(".json").read_text())
    return rep["shares"][domain]["selected_share"]


# ------------------------------------------------------------------------------------------ DSIR
def test_dsir_importance_weights_by_hand():
    """Unigrams: target 'a a b' -> p_t = (2/3, 1/3, 0); raw pool 'a b' + 'c c' -> p_r = (1/4, 1/4, 1/2); the log
    importance weight of a document is the sum over its words of log(p_t + 1e-8) - log(p_r + 1e-8)."""
    opts = dsir.DSIROptions(ngrams=1, buckets=10000)
    b = {w: int(dsir.text_features([w], opts)[0][0]) for w in "abc"}
    assert len(set(b.values())) == 3  # no collision in this toy case
    t = np.bincount(dsir.text_features(["a a b"], opts)[0], minlength=opts.buckets).astype(float)
    b_raw, d_raw, words = dsir.text_features(["a b", "C, c"], opts)  # lowercased; ',' is a word too
    raw = np.bincount(b_raw, minlength=opts.buckets).astype(float)
    ld = dsir.log_diff(t, raw)
    got = np.bincount(d_raw, weights=ld[b_raw], minlength=2)
    L = math.log
    p_comma = 1 / 5  # raw: a, b, c, ',', c
    want = [L(2 / 3 + 1e-8) - L(1 / 5 + 1e-8) + L(1 / 3 + 1e-8) - L(1 / 5 + 1e-8),
            2 * (L(1e-8) - L(2 / 5 + 1e-8)) + (L(1e-8) - L(p_comma + 1e-8))]
    assert words.tolist() == [2, 3]
    assert got == pytest.approx(want, rel=1e-12)
    # bigrams add one term per adjacent pair within a document, never across documents
    _b2, d2, _ = dsir.text_features(["a b", "c c"], dsir.DSIROptions(ngrams=2, buckets=10000))
    assert np.bincount(d2).tolist() == [3, 3]


def test_dsir_words_are_wordpunct_tokens():
    """nltk's WordPunctTokenizer of the lowercased text: runs of \\w or of non-space non-\\w characters."""
    text = "Hello, World!! it's naïve --> café_x 3.14"
    want = ["hello", ",", "world", "!!", "it", "'", "s", "naïve", "-->", "café_x", "3", ".", "14"]
    h, _doc = dsir.word_hashes([text])
    assert len(h) == len(want)
    seen: dict[str, int] = {}
    for w, x in zip(want, h.tolist()):
        assert seen.setdefault(w, x) == x
    assert dsir.word_hashes(["it"])[0][0] == h[4] and dsir.word_hashes(["x, HELLO"])[0][-1] == h[0]


def test_dsir_prefers_the_target_like_domain(pool_dir, target_a, tmp_path, capsys):
    out = tmp_path / "sel.parquet"
    assert select(pool_dir, out, "--target", str(target_a), "--dsir-min-words", "1",
                  "--write-scores", str(tmp_path / "scores.parquet")) == 0
    assert domain_share(pool_dir, out) > 0.9
    printed = capsys.readouterr().out
    assert "domain" in printed and "selected" in printed
    scores = pq.read_table(tmp_path / "scores.parquet")
    assert scores.num_rows == 160 and scores.column_names[:2] == ["doc_id", "score"]
    by_dom = {d: np.mean([s for s, dd in zip(scores["score"].to_pylist(), scores["domain"].to_pylist()) if dd == d])
              for d in ("a", "b")}
    assert by_dom["a"] > by_dom["b"]
    info = read_selection_info(out)
    assert info["method"] == "dsir" and info["settings"]["buckets"] == 10000 and info["fingerprint"]


def test_dsir_token_features_and_min_words(pool_dir, target_a, tmp_path):
    out = tmp_path / "tok.parquet"
    assert select(pool_dir, out, "--target", str(target_a), "--dsir-features", "tokens",
                  "--dsir-min-words", "1") == 0
    assert domain_share(pool_dir, out) > 0.9
    assert select(pool_dir, out, "--target", str(target_a)) == 2  # every toy document has < 100 words


def long_a_pool(pool_dir: Path, out: Path, rows_per_doc: int = 8) -> Path:
    """pool_dir's rows reordered: domain a's rows first, as documents of `rows_per_doc` rows each (long), then
    domain b's, one row a document (short)."""
    shutil.copytree(pool_dir, out)
    meta = json.loads((out / "meta.json").read_text())
    t = pq.read_table(out / "train.parquet")
    rows = np.fromfile(out / "train.bin", dtype=meta["dtype"]).reshape(t.num_rows, meta["seq_len"])
    dom = np.array(t["domain"].to_pylist())
    order = np.concatenate([np.flatnonzero(dom == "a"), np.flatnonzero(dom == "b")])
    rows[order].tofile(out / "train.bin")
    t = t.take(pa.array(order))
    n_a = int((dom == "a").sum())
    ids = [f"a-{i // rows_per_doc}" if i < n_a else f"b-{i}" for i in range(t.num_rows)]
    t = t.set_column(t.column_names.index("doc_id"), "doc_id", pa.array(ids, pa.string()))
    t = t.set_column(0, "sample_id", pa.array(np.arange(t.num_rows, dtype=np.int64)))
    pq.write_table(t, out / "train.parquet")
    return out


def test_dsir_mean_selects_long_target_like_documents(pool_dir, tmp_path):
    """Domain a's documents are long (8 rows) and like the target, b's short and unlike it. The target is small, so
    many of a's bigrams are missing from it and every document's n-grams have a negative log ratio on average:
    the whole-document sum (`--dsir-score sum`) ranks the long documents last, the mean per n-gram (the default)
    first."""
    data = long_a_pool(pool_dir, tmp_path / "long")
    rng = np.random.default_rng(3)
    target = tmp_path / "small_target.jsonl"
    target.write_text("".join(json.dumps({"text": " ".join(rng.choice(_WORDS[0].split(), size=12))}) + "\n"
                              for _ in range(6)))
    pool = Pool(data)
    assert len(pool) == 10 + 80 and pool.unit_tokens[:10].min() > 4 * pool.unit_tokens[10:].max()
    budget = pool.total_tokens // 4
    out = tmp_path / "sel.parquet"
    args = ["--target", str(target), "--dsir-min-words", "1", "--write-scores", str(tmp_path / "s.parquet")]
    assert select(data, out, *args, budget=budget) == 0
    assert domain_share(data, out) > 0.9
    mean = pq.read_table(tmp_path / "s.parquet")["score"].to_numpy()
    assert select(data, out, *args, "--dsir-score", "sum", budget=budget) == 0
    assert domain_share(data, out) < 0.1
    total = pq.read_table(tmp_path / "s.parquet")["score"].to_numpy()
    assert total.max() < 0 and total[:10].max() < np.median(total[10:])  # the sum: long documents rank last
    # mean = sum / the document's n-grams x the n-grams of a 128-word example (128 unigrams + 127 bigrams)
    texts = [t for s in pool.shards() for t in dsir.shard_texts(s)]
    _b, d, _w = dsir.text_features(texts, dsir.DSIROptions(ngrams=2))
    n = np.bincount(d, minlength=len(texts))
    assert dsir.DSIROptions(ngrams=2).example_ngrams == 255 and dsir.DSIROptions(ngrams=3).example_ngrams == 381
    assert mean == pytest.approx(total / n * 255, rel=1e-9)
    assert info_settings(out)["score"] == "sum"
    with pytest.raises(UserError, match="--dsir-score must be mean or sum"):
        dsir.DSIROptions(score="avg").validate()  # type: ignore[arg-type]


def info_settings(path) -> dict:
    return read_selection_info(path)["settings"]


# ------------------------------------------------------------------------------------------ Gumbel top-k
def test_gumbel_top_k_inclusion_frequencies():
    """Drawing 2 of 5 by Gumbel top-k on log w: inclusion probability of i is the Plackett-Luce one,
    p_i + sum_j p_j p_i / (1 - p_j); 4000 seeded draws are within 4 standard errors of it."""
    w = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    p = w / w.sum()
    exact = np.array([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(5) if j != i) for i in range(5)])
    n = 4000
    counts = np.zeros(5)
    for seed in range(n):
        counts[fill_budget(gumbel_keys(np.log(w), 1.0, seed), np.ones(5, np.int64), 2)] += 1
    freq = counts / n
    se = np.sqrt(exact * (1 - exact) / n)
    assert np.all(np.abs(freq - exact) < 4 * se), (freq, exact)
    # temperature 2 samples proportional to w^(1/2); temperature 0 is the deterministic top-k
    assert fill_budget(gumbel_keys(np.log(w), 0.0, 0), np.ones(5, np.int64), 2).tolist() == [4, 3]


def test_budget_counts_tokens_until_met():
    tokens = np.array([5, 7, 3, 10])
    chosen = fill_budget(np.array([4.0, 3.0, 2.0, 1.0]), tokens, 12)
    assert chosen.tolist() == [0, 1] and tokens[chosen].sum() >= 12
    assert fill_budget(np.array([4.0, 3.0, 2.0, 1.0]), tokens, 13).tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------ quality
def test_classifier_prefers_the_target_like_domain(pool_dir, target_a, tmp_path):
    out = tmp_path / "q.parquet"
    assert select(pool_dir, out, "--classifier", "--target", str(target_a), "--top-k", method="quality") == 0
    assert domain_share(pool_dir, out) > 0.9
    assert read_selection_info(out)["settings"]["source"] == "classifier"


def test_quality_column_top_k_and_qurating_names(pool_dir, tmp_path, capsys):
    out = tmp_path / "c.parquet"
    assert select(pool_dir, out, "--score-column", "quality", "--top-k", method="quality") == 0
    ids, scores = manifest(out)
    allq = pq.read_table(pool_dir / "train.parquet")["quality"].to_numpy()
    assert min(scores) >= np.sort(allq)[::-1][len(set(ids)) - 1] - 1e-12  # the highest-scoring documents
    # a QuRatedPajama-style column is found by its criterion's name
    d = tmp_path / "qurated"
    shutil.copytree(pool_dir, d)
    t = pq.read_table(d / "train.parquet")
    pq.write_table(t.rename_columns([c if c != "quality" else "educational_value_average" for c in t.column_names]),
                   d / "train.parquet")
    assert select(d, tmp_path / "e.parquet", "--score-column", "educational_value", method="quality") == 0
    assert read_selection_info(tmp_path / "e.parquet")["settings"]["column"] == "educational_value_average"
    capsys.readouterr()
    assert select(pool_dir, tmp_path / "x.parquet", "--score-column", "qualty", method="quality") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean quality?" in err


def test_quality_hf_checkpoint(pool_dir, tmp_path):
    """A local sequence-classification checkpoint (a tiny random BERT with the pool's tokenizer), offline."""
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(pool_dir / "tokenizer.json"), pad_token="<pad>",
                                  eos_token="<|endoftext|>")
    ckpt = tmp_path / "rater"
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=2, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for out in (a, b):
        assert select(pool_dir, out, "--score-model", str(ckpt), "--label", "1", "--max-length", "64",
                      method="quality") == 0
    assert manifest(a) == manifest(b)
    assert all(math.isfinite(s) for s in manifest(a)[1])
    assert select(pool_dir, a, "--score-model", str(ckpt), "--label", "2", method="quality") == 2


# ------------------------------------------------------------------------------------------ perplexity
def test_perplexity_bands_from_a_dwm_run(pool_dir, tmp_path, make_cfg):
    from dwm.train.trainer import Trainer

    run = tmp_path / "lm"
    Trainer(make_cfg("train.max_steps=3", f"data.dir={pool_dir}", out=run)).train()
    nll = {}
    for band in ("lowest", "middle", "highest"):
        out = tmp_path / f"{band}.parquet"
        assert select(pool_dir, out, "--ref-model", str(run), "--band", band, method="perplexity") == 0
        nll[band] = np.mean(manifest(out)[1])
        assert read_selection_info(out)["settings"]["tokenization"] == "prepared rows"
    assert nll["lowest"] < nll["middle"] < nll["highest"]


# ------------------------------------------------------------------------------------------ into dwm train
def test_manifest_round_trips_into_dwm_train(pool_dir, tmp_path, make_cfg):
    from dwm.train.trainer import Trainer

    out = tmp_path / "r.parquet"
    assert select(pool_dir, out, method="random", budget=800) == 0
    ids, _ = manifest(out)
    assert len(set(ids)) == len(ids)
    tr = Trainer(make_cfg("train.max_steps=2", f"data.dir={pool_dir}", f"data.selection={out}"))
    assert tr.pool.tolist() == ids
    tr.train()
    pool = Pool(pool_dir)
    assert pool.row_tokens[ids].sum() >= 800


def test_train_refuses_a_manifest_of_another_prepared_dir(pool_dir, prepared_dir, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    assert select(pool_dir, out, method="random", budget=300) == 0
    capsys.readouterr()
    rc = main(["train", "--data", str(prepared_dir), "--selection", str(out), "--out", str(tmp_path / "run"),
               "model.spec=tiny", "train.max_steps=1", "train.device=cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "fingerprint" in err
    # a manifest without metadata (hand-made, or from dwm.data.mixture) still works
    from dwm.data.mixture import write_manifest
    from dwm.train.trainer import load_selection

    write_manifest(np.arange(5), tmp_path / "plain.parquet")
    assert load_selection(str(tmp_path / "plain.parquet"), 64, prepared_dir).tolist() == list(range(5))


# ------------------------------------------------------------------------------------------ determinism, engines
@pytest.mark.parametrize("method, extra", [("random", []), ("dsir", ["--dsir-min-words", "1"]),
                                           ("quality", ["--score-column", "quality"])])
def test_same_seed_same_selection(pool_dir, target_a, tmp_path, method, extra):
    args = [*extra, "--target", str(target_a)]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert select(pool_dir, tmp_path / f"{name}.parquet", "--seed", str(seed), *args, method=method) == 0
        runs[name] = manifest(tmp_path / f"{name}.parquet")
    assert runs["a"] == runs["b"] and runs["a"][0] != runs["c"][0]


@pytest.mark.slow
def test_local_engine_workers_do_not_change_the_selection(pool_dir, target_a, tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert select(pool_dir, a, "--dsir-min-words", "1", "--target", str(target_a)) == 0
    assert main(["select", "--data", str(pool_dir), "--method", "dsir", "--budget-tokens", "1200", "--out", str(b),
                 "--dsir-min-words", "1", "--target", str(target_a), "--workers", "2"]) == 0
    assert manifest(a) == manifest(b)


@pytest.mark.slow
def test_ray_engine_equals_local(pool_dir, target_a, tmp_path):
    """`dwm select --engine ray` writes the local engine's manifest and scores; `dwm prepare --engine ray` the local
    engine's prepared directory, byte for byte. One local Ray instance serves both (started here, as a user's
    shell would: the commands then leave it running)."""
    pytest.importorskip("ray")
    from dwm.data import rayjobs

    a, b = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    args = ["--dsir-min-words", "1", "--target", str(target_a), "--write-scores"]
    assert select(pool_dir, a, *args, str(tmp_path / "sa.parquet")) == 0
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for k, name in enumerate(("books__x.jsonl", "news__y.jsonl", "code__z.jsonl")):
        words = _WORDS[k].split()
        rows = [{"id": f"{name}{i}", "text": " ".join(rng.choice(words, size=int(rng.integers(5, 80))))}
                for i in range(40)]
        rows.insert(3, {"id": "bad", "text": ""})  # a skipped record: the skip counts must merge the same way
        (inputs / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    prep = ["prepare", str(inputs), "--vocab-size", "300", "--seq-len", "16", "--val-fraction", "0.1",
            "--no-progress"]
    assert main([*prep, "--out", str(tmp_path / "prep-local")]) == 0
    assert rayjobs.start(2)
    try:
        assert main(["select", "--data", str(pool_dir), "--method", "dsir", "--budget-tokens", "1200", "--out",
                     str(b), "--engine", "ray", "--workers", "2", *args, str(tmp_path / "sb.parquet")]) == 0
        assert main([*prep, "--out", str(tmp_path / "prep-ray"), "--engine", "ray"]) == 0
    finally:
        rayjobs.stop()
    assert manifest(a) == manifest(b)
    assert pq.read_table(tmp_path / "sa.parquet").equals(pq.read_table(tmp_path / "sb.parquet"))
    for f in ("meta.json", "stats.json", "tokenizer.json", "train.bin", "train.parquet", "val.bin", "val.parquet"):
        assert (tmp_path / "prep-local" / f).read_bytes() == (tmp_path / "prep-ray" / f).read_bytes(), f


# ------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_are_one_line_errors(pool_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\x01 not json\n")
    cases = [
        (["--method", "random", "--budget-tokens", "10000000"], "larger than the pool"),
        (["--method", "random", "--budget-tokens", "0"], "must be > 0"),
        (["--method", "dsir", "--budget-tokens", "100", "--target", str(empty)], "has no text"),
        (["--method", "dsir", "--budget-tokens", "100", "--target", str(garbage)], "garbage.jsonl"),
        (["--method", "dsir", "--budget-tokens", "100", "--target", str(tmp_path / "nope.jsonl")], "does not exist"),
        (["--method", "quality", "--budget-tokens", "100", "--score-column", "nope"], "no such score column"),
        (["--method", "quality", "--budget-tokens", "100", "--score-model", str(tmp_path)], "not a local"),
        (["--method", "quality", "--budget-tokens", "100"], "needs exactly one"),
        (["--method", "perplexity", "--budget-tokens", "100", "--ref-model", str(tmp_path)], "neither a dwm run"),
        (["--method", "influence", "--budget-tokens", "100"], "selector.mode=influence"),
    ]
    for args, msg in cases:
        rc = main(["select", "--data", str(pool_dir), "--out", str(tmp_path / "o.parquet"), "--workers", "1",
                   *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and msg in err, (args, err)
    rc = main(["select", "--data", str(tmp_path / "none"), "--method", "random", "--budget-tokens", "1",
               "--out", str(tmp_path / "o.parquet")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ influence (online)
def test_influence_selector_prefers_the_target_like_domain(pool_dir, target_a, make_cfg, tmp_path):
    """MATES-style online selection keeps more of the target-like domain than the candidate pools hold, and the
    dropped candidates never reach the LM."""
    from dwm.run import build_trainer

    cfg = make_cfg("train.max_steps=8", f"data.dir={pool_dir}", "selector.mode=influence", "selector.every=2",
                   "selector.candidates=2", f"influence.reference={target_a}", "influence.probe=0.5",
                   "influence.ref_batch=8", "optim.lr=3e-3")
    tr = build_trainer(cfg)
    seen: list[int] = []
    orig = tr.local_batch

    def spy(step):
        b = orig(step)
        seen.extend(b.sample_ids.tolist())
        return b

    tr.local_batch = spy
    tr.train()
    dom = tr.train_data.domain_ids
    a = tr.train_data.domains.index("a")
    kept_share = float(np.mean(dom[seen] == a))
    G = tr.plan.global_batch_size
    cands = np.concatenate([tr.selector.stream(c * 4 * G, 4 * G) for c in range(4)])
    assert kept_share > float(np.mean(dom[cands] == a)) + 0.1
    assert set(seen) <= set(cands.tolist()) and len(seen) == len(cands) // 2
    events = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    infl = [e for e in events if e.get("event") == "influence"]
    assert len(infl) == 4 and all(e["probed"] == 2 * G for e in infl)


def test_influence_selector_resumes_exactly(pool_dir, target_a, make_cfg, tmp_path):
    """Killed after step 3 (inside the second selection) and resumed: the same batches as one uninterrupted run,
    because the kept ids, the probe history and the seeds are in the checkpoint."""
    from dwm.run import build_trainer

    def cfg(out, *extra):
        return make_cfg("train.max_steps=6", f"data.dir={pool_dir}", "selector.mode=influence", "selector.every=2",
                        f"influence.reference={target_a}", "influence.ref_batch=4", *extra, out=out)

    def record(tr):
        seen, orig = [], tr.local_batch
        tr.local_batch = lambda step: (b := orig(step), seen.append(b.sample_ids.tolist()))[0]
        return seen

    a = build_trainer(cfg(tmp_path / "a"))
    full = record(a)
    a.train()
    b = build_trainer(cfg(tmp_path / "b", "checkpoint.every=1"))
    b.total_steps = 3
    b.train()
    c = build_trainer(cfg(tmp_path / "b", "checkpoint.every=1"), resume=True)
    rest = record(c)
    c.train()
    assert rest == full[3:]


def test_influence_config_is_checked(make_cfg, capsys, prepared_dir, tmp_path):
    rc = main(["train", "--data", str(prepared_dir), "--out", str(tmp_path / "r"), "model.spec=tiny",
               "train.max_steps=1", "selector.mode=influence", f"influence.reference={tmp_path / 'none.jsonl'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "influence.reference" in err and err.count("\n") == 1
    rc = main(["train", "--data", str(prepared_dir), "--out", str(tmp_path / "r"), "model.spec=tiny",
               "train.max_steps=1", "influence.probe=0"])
    assert rc == 2 and "influence.probe" in capsys.readouterr().err


def test_pool_documents_group_consecutive_rows(tmp_path):
    """With stream packing a document spans consecutive rows; a selection unit is such a run of rows."""
    from dwm.testing import make_synthetic_prepared

    d = make_synthetic_prepared(tmp_path / "p", n_train=12, n_val=2, seq_len=16)
    t = pq.read_table(d / "train.parquet")
    docs = ["d0", "d0", "d1", "d2", "d2", "d2", "d3", "d4", "d4", "d5", "d6", "d7"]
    t = t.set_column(t.column_names.index("doc_id"), "doc_id", pa.array(docs))
    t = t.set_column(t.column_names.index("source"), "source", pa.array(["s"] * 11 + ["s2"]))
    pq.write_table(t, d / "train.parquet")
    pool = Pool(d)
    assert len(pool) == 8 and pool.unit_rows.tolist() == [0, 2, 3, 6, 7, 9, 10, 11, 12]  # d7: another source
    assert pool.unit_tokens.sum() == pool.row_tokens.sum()
    from dwm.selection.pool import manifest_rows

    ids, doc = manifest_rows(pool, np.array([3, 0]), seed=0)
    assert sorted(ids.tolist()) == [0, 1, 6] and sorted(doc.tolist()) == [0, 0, 3]


def test_fast_decode_equals_the_tokenizers_decode(pool_dir):
    """The vectorised byte-level decode gives the tokenizer's own decode_batch text (EOS as a newline)."""
    from dwm.selection import pool as P

    shard = Pool(pool_dir).shards()[0]
    flat, off = P.shard_tokens(shard)
    docs = [flat[a:b] for a, b in itertools.pairwise(off)]
    fast = P.decode(shard.dir, docs)
    P._BYTE_TABLES[shard.dir] = None  # what a tokenizer that is not byte-level gets
    try:
        slow = P.decode(shard.dir, docs)
    finally:
        P._BYTE_TABLES.pop(shard.dir)
    assert fast == slow and any("\n" in t for t in fast)
