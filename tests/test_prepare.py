"""`dwm prepare` end to end on tiny inputs: layout, packing, dtype, determinism, resume, errors, split, scores."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dwm.cli import main as cli_main
from dwm.data import tokenizer as tkz
from dwm.data.prepare import OUTPUT_FILES, PrepareOptions, is_val, prepare
from dwm.errors import UserError

WORDS = ["the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "river", "stone", "window", "garden", "letter", "morning", "silver", "quiet"]


def make_docs(n: int, seed: int, prefix: str, score: bool = False) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        d = {"id": f"{prefix}{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120)))}
        if score:
            d["q"] = round(rng.random(), 6)
        docs.append(d)
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("corpus")
    web = make_docs(150, 1, "w", score=True)
    books = make_docs(100, 2, "b", score=True)
    return {"dir": d, "web": web, "books": books,
            "paths": [write_jsonl(d / "web__cc.jsonl", web), write_jsonl(d / "books__pg.jsonl", books)]}


@pytest.fixture(scope="module")
def tok_path(corpus, tmp_path_factory) -> Path:
    tok = tkz.train_bpe([x["text"] for x in corpus["web"] + corpus["books"]], 300)
    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(p))
    return p


def opts(**kw) -> PrepareOptions:
    base = {"seq_len": 32, "val_fraction": 0.2, "workers": 1, "vocab_size": 300, "progress": False}
    base.update(kw)
    return PrepareOptions(**base)


def load_split(out: Path, split: str):
    meta = json.loads((out / "meta.json").read_text())
    n = meta["splits"][split]["n_samples"]
    tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).reshape(n, meta["seq_len"])
    return meta, tokens, pq.read_table(out / f"{split}.parquet")


def file_bytes(out: Path) -> dict[str, bytes]:
    return {f: (out / f).read_bytes() for f in (*OUTPUT_FILES, "meta.json")}


# --- tokenizer ----------------------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_loading(tmp_path):
    texts = ["Hello world, the river is quiet.", "naïve café — 東京 🙂", "tabs\tand\nnewlines  "] * 20
    tok = tkz.train_bpe(texts, 300)
    assert (tok.token_to_id(tkz.EOS), tok.token_to_id(tkz.PAD)) == (0, 1)
    for t in texts[:3] + ["unseen bytes: ß ∑ \x7f"]:
        assert tok.decode(tok.encode(t).ids) == t  # byte-level: never lossy, no <unk>
    assert tkz.vocab_size(tok) == 300
    tok.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path):  # a file, or an HF tokenizer directory
        loaded, eos, pad = tkz.load_tokenizer(path)
        assert (eos, pad) == (0, 1)
        assert tkz.encode_batch(loaded, texts[:3]) == [tok.encode(t).ids for t in texts[:3]]
    with pytest.raises(UserError, match="does not exist"):
        tkz.load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(UserError, match="cannot load tokenizer"):
        tkz.load_tokenizer(tmp_path / "junk.json")


def test_dtype_choice():
    assert tkz.choose_dtype(300) == np.uint16
    assert tkz.choose_dtype(65535) == np.uint16
    assert tkz.choose_dtype(65536) == np.uint32
    assert tkz.choose_dtype(128256) == np.uint32


# --- layout: memmap <-> parquet <-> documents -------------------------------------------------------------------
def reconstruct_streams(out: Path, split: str):
    """Real tokens of consecutive rows of one source, concatenated: must equal that source's docs + EOS each."""
    meta, tokens, table = load_split(out, split)
    streams: dict[str, list[int]] = {}
    n_tok = table.column("n_tokens").to_numpy()
    for i, src in enumerate(table.column("source").to_pylist()):
        row = tokens[i]
        assert np.all(row[n_tok[i]:] == meta["pad_id"])
        streams.setdefault(src, []).extend(row[: n_tok[i]].tolist())
    return meta, tokens, table, streams


@pytest.mark.parametrize("packing", ["stream", "doc"])
def test_memmap_parquet_and_documents_agree(corpus, tok_path, tmp_path, packing):
    out = tmp_path / "out"
    meta = prepare(corpus["paths"], out, opts(tokenizer=str(tok_path), packing=packing, score_fields=("q",)))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = meta["eos_id"]
    assert meta["format"] == "dwm-prepared/1" and meta["dtype"] == "uint16" and meta["packing"] == packing
    assert meta["domains"] == ["books", "web"] and meta["score_columns"] == ["q"]
    by_id = {d["id"]: (d, src) for src in ("web", "books") for d in corpus[src]}
    seen_docs = 0
    for split in ("train", "val"):
        _, tokens, table, streams = reconstruct_streams(out, split)
        assert table.column_names == ["sample_id", "doc_id", "domain", "source", "n_tokens", "q"]
        assert table.schema.field("n_tokens").type == pa.int32()
        assert table.column("sample_id").to_pylist() == list(range(len(tokens)))
        split_docs = {src: [d for d in corpus[dom] if is_val(d["id"], 0, 0.2) == (split == "val")]
                      for dom, src in (("web", "cc"), ("books", "pg"))}
        for src, docs in split_docs.items():
            expected = [t for d in docs for t in tok.encode(d["text"], add_special_tokens=False).ids + [eos]]
            assert streams[src] == expected
        seen_docs += sum(len(v) for v in split_docs.values())
        assert meta["splits"][split]["n_docs"] == sum(len(v) for v in split_docs.values())
        n_tok = table.column("n_tokens").to_numpy()
        for i, (doc_id, dom, q) in enumerate(zip(*(table.column(c).to_pylist() for c in ("doc_id", "domain", "q")))):
            doc, corp = by_id[doc_id]
            assert dom == corp and q == doc["q"]
            first = tokens[i, : n_tok[i]].tolist()
            first = first[: first.index(eos)] if eos in first else first
            assert tok.decode(first) in doc["text"]  # the row starts inside its own document
        if packing == "stream":  # only a source's last row is short
            short = np.flatnonzero(n_tok < 32)
            assert len(short) <= 2
        else:  # one row per document start; a document's rows are consecutive
            starts = [i for i in range(len(n_tok)) if i == 0 or table.column("doc_id")[i - 1] != table.column("doc_id")[i]]
            assert len(starts) == meta["splits"][split]["n_docs"]
    assert seen_docs == 250
    stats = json.loads((out / "stats.json").read_text())
    assert stats["docs_in"] == stats["docs_written"] + stats["docs_skipped"] == 250

    from dwm.data.dataset import PreparedData  # the reader the trainer uses accepts the output

    data = PreparedData(out, "train")
    b = data.batch([0, len(data) - 1])
    assert b.input_ids.shape == (2, 32) and b.n_tokens.tolist() == data.n_tokens[[0, -1]].tolist()


def test_uint32_for_large_vocab(tmp_path):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tkz.EOS: 0, tkz.PAD: 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    while len(vocab) < 70000:
        vocab[f"zz{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tkz.EOS, tkz.PAD])
    tok.save(str(tmp_path / "big.json"))
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "abc def"}, {"id": "b", "text": "xyz"}])
    meta = prepare([src], tmp_path / "out", opts(tokenizer=str(tmp_path / "big.json"), val_fraction=0.0))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70000
    _, tokens, table = load_split(tmp_path / "out", "train")
    assert (tmp_path / "out" / "train.bin").stat().st_size == len(tokens) * 32 * 4
    assert tok.decode(tokens[0, : table.column("n_tokens")[0].as_py()].tolist()) == "abc defxyz"


# --- determinism, idempotence, resume --------------------------------------------------------------------------
@pytest.mark.slow
def test_deterministic_and_independent_of_workers(corpus, tmp_path):
    a = prepare(corpus["paths"], tmp_path / "a", opts(score_fields=("q",)))  # also trains the tokenizer
    b = prepare(corpus["paths"], tmp_path / "b", opts(score_fields=("q",), workers=2))
    assert a == b
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert a["tokenizer"]["trained"] and a["vocab_size"] == 300


def test_finished_dir_not_redone_and_changed_input_redone(corpus, tok_path, tmp_path, capsys):
    src = write_jsonl(tmp_path / "web__x.jsonl", corpus["web"][:40])
    o = opts(tokenizer=str(tok_path))
    prepare([src], tmp_path / "out", o)
    mtime = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    capsys.readouterr()
    prepare([src], tmp_path / "out", o)
    assert "already prepared" in capsys.readouterr().out
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == mtime
    prepare([src], tmp_path / "out", opts(tokenizer=str(tok_path), seq_len=16))  # options changed: redone
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["seq_len"] == 16
    write_jsonl(src, corpus["web"][:20])  # input changed: redone
    prepare([src], tmp_path / "out", opts(tokenizer=str(tok_path), seq_len=16))
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["docs_in"] == 20


@pytest.mark.slow
def test_resume_after_kill_matches_clean_run(corpus, tok_path, tmp_path):
    args = [*map(str, corpus["paths"]), "--tokenizer", str(tok_path), "--seq-len", "32", "--val-fraction", "0.2",
            "--workers", "1", "--score-fields", "q", "--no-progress"]
    killed = tmp_path / "killed"
    # the fault is injected here, not in the library: the 120th document written kills the process
    code = ("import os, sys\nimport dwm.data.prepare as P\nn = [0]\norig = P.SplitWriter.add\n"
            "def add(self, doc, ids):\n    orig(self, doc, ids)\n    n[0] += 1\n    if n[0] >= 120:\n"
            "        os._exit(137)\nP.SplitWriter.add = add\n"
            "from dwm.cli import main\nsys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, "prepare", *args, "--out", str(killed)], env=env, check=False,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 137, r.stderr
    assert not (killed / "meta.json").exists()  # a killed run is never mistaken for a finished one
    assert (killed / ".tmp-prepare" / "train.bin").exists()
    assert cli_main(["prepare", *args, "--out", str(killed)]) == 0
    assert cli_main(["prepare", *args, "--out", str(tmp_path / "clean")]) == 0
    assert file_bytes(killed) == file_bytes(tmp_path / "clean")
    assert not (killed / ".tmp-prepare").exists()


# --- bad input ------------------------------------------------------------------------------------------------
def test_bad_input_counts_and_fail_mode(tmp_path, tok_path, capsys):
    good = make_docs(10, 3, "g")
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"\n".join([json.dumps(good[0]).encode(), b"{oops", json.dumps({"id": "m"}).encode(),
                              json.dumps({"text": ["list"]}).encode(), json.dumps({"text": " "}).encode(),
                              b'{"text": "\xff\xfe"}', b'{"text": "\x00\x01"}',
                              *(json.dumps(d).encode() for d in good[1:])]) + b"\n")
    t = tmp_path / "txt"
    t.mkdir()
    (t / "bin.txt").write_bytes(bytes(range(256)))
    (t / "ok.txt").write_text("a real text document")
    meta = prepare([p, t], tmp_path / "out", opts(tokenizer=str(tok_path), val_fraction=0.0))
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["skipped"] == {"binary": 2, "empty": 1, "invalid_json": 1, "invalid_utf8": 1,
                                "missing_text": 1, "non_string_text": 1}
    assert (stats["docs_in"], stats["docs_written"], stats["docs_skipped"]) == (18, 11, 7)
    assert meta["splits"]["train"]["n_docs"] == 11
    assert "skipped 7" in capsys.readouterr().out

    with pytest.raises(UserError, match=r"mixed\.jsonl:2: invalid JSON"):
        prepare([p], tmp_path / "out2", opts(tokenizer=str(tok_path), on_error="fail"))
    # through the CLI: one line, exit code 2, no traceback
    rc = cli_main(["prepare", str(p), "--out", str(tmp_path / "out3"), "--tokenizer", str(tok_path),
                   "--on-error", "fail", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "mixed.jsonl:2" in err and "Traceback" not in err and err.count("\n") == 1


def test_path_errors(tmp_path, tok_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "x y"}])
    with pytest.raises(UserError, match="does not exist"):
        prepare([tmp_path / "missing.jsonl"], tmp_path / "out", opts(tokenizer=str(tok_path)))
    with pytest.raises(UserError, match="not a directory"):
        prepare([src], src, opts(tokenizer=str(tok_path)))
    (tmp_path / "allbad.jsonl").write_text("nope\n \n")
    with pytest.raises(UserError, match="no documents"):
        prepare([tmp_path / "allbad.jsonl"], tmp_path / "o", opts(tokenizer=str(tok_path)))
    with pytest.raises(UserError, match="seq-len"):
        prepare([src], tmp_path / "o", opts(seq_len=1))
    assert cli_main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "input path does not exist" in capsys.readouterr().err


# --- split, scores, domains -----------------------------------------------------------------------------------
def test_split_by_document_is_disjoint_and_seeded(corpus, tok_path, tmp_path):
    ids_all = {d["id"] for d in corpus["web"] + corpus["books"]}
    splits = {}
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        prepare(corpus["paths"], out, opts(tokenizer=str(tok_path), seed=seed, val_fraction=0.3))
        tr = set(pq.read_table(out / "train.parquet").column("doc_id").to_pylist())
        va = set(pq.read_table(out / "val.parquet").column("doc_id").to_pylist())
        assert not tr & va and va
        expected_val = {i for i in ids_all if is_val(i, seed, 0.3)}
        assert va <= expected_val and tr <= ids_all - expected_val
        assert 0.15 < len(expected_val) / len(ids_all) < 0.45
        splits[seed] = expected_val
    assert splits[0] != splits[1]


def test_domain_field_and_missing_scores(tmp_path, tok_path):
    docs = [{"id": f"d{i}", "text": f"document {i} of the set", "dom": ["law", "news"][i % 2], "s": i}
            for i in range(6)]
    del docs[5]["s"]
    src = write_jsonl(tmp_path / "mixed.jsonl", docs)
    out = tmp_path / "out"
    meta = prepare([src], out, opts(tokenizer=str(tok_path), val_fraction=0.0, packing="doc",
                                    domain_field="dom", score_fields=("s",)))
    assert meta["domains"] == ["law", "news"]
    t = pq.read_table(out / "train.parquet").to_pydict()
    assert t["domain"] == ["law", "news"] * 3 and t["source"] == ["mixed"] * 6
    assert t["s"][:5] == [0.0, 1.0, 2.0, 3.0, 4.0] and np.isnan(t["s"][5])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["scores_missing"] == 1
    assert {d: v["docs"] for d, v in stats["per_domain"].items()} == {"law": 3, "news": 3}
    assert sum(v["bytes"] for v in stats["per_domain"].values()) == sum(len(d["text"]) for d in docs)


def test_output_inside_input_directory_is_not_read_back(tmp_path, tok_path):
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "web__a.jsonl", make_docs(20, 5, "a"))
    o = opts(tokenizer=str(tok_path), val_fraction=0.0)
    first = prepare([d], d / "prepared", o)
    again = prepare([d], d / "prepared", PrepareOptions(**{**o.__dict__, "force": True}))
    assert first == again and first["splits"]["train"]["n_docs"] == 20
