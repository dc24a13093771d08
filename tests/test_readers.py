"""Readers: every input format, domain/source naming, and every bad-input reason with exact counts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dwm.data.readers import ReadOptions, SkipCounter, domain_source_from_name, expand_inputs, iter_documents
from dwm.errors import UserError


def read_all(paths, **kw):
    counter = SkipCounter()
    sources, ignored = expand_inputs(paths)
    docs = [d for s in sources for d in iter_documents(s, ReadOptions(**kw), counter)]
    return docs, counter, sources, ignored


def write_jsonl(path: Path, recs) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in recs).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def test_domain_source_from_name():
    assert domain_source_from_name("code__pypi.jsonl.zst") == ("code", "pypi")
    assert domain_source_from_name("books__gutenberg_en.jsonl.gz") == ("books", "gutenberg_en")
    assert domain_source_from_name("plain.jsonl") == ("plain", "plain")
    assert domain_source_from_name("x.parquet") == ("x", "x")
    assert domain_source_from_name("__odd.jsonl") == ("__odd", "__odd")


@pytest.mark.parametrize("name", ["a__s.jsonl", "a__s.jsonl.gz", "a__s.jsonl.zst"])
def test_jsonl_variants(tmp_path, name):
    recs = [{"id": f"d{i}", "text": f"doc number {i} é", "q": i / 2} for i in range(5)]
    p = write_jsonl(tmp_path / name, recs)
    docs, c, _, _ = read_all([p], score_fields=("q",))
    assert [d.text for d in docs] == [r["text"] for r in recs]
    assert [d.doc_id for d in docs] == [r["id"] for r in recs]
    assert {(d.domain, d.source) for d in docs} == {("a", "s")}
    assert [d.scores for d in docs] == [(r["q"],) for r in recs]
    assert docs[0].n_bytes == len(recs[0]["text"].encode())
    assert (c.docs_in, c.docs_skipped) == (5, 0)


def test_parquet_txtdir_hf_and_directory(tmp_path):
    pq.write_table(pa.table({"text": ["p one", "p two", None], "id": ["p1", "p2", "p3"]}), tmp_path / "w__pq.parquet")
    txt = tmp_path / "books__txt"
    (txt / "sub").mkdir(parents=True)
    (txt / "a.txt").write_text("alpha text")
    (txt / "sub" / "b.txt").write_text("\ufeffbeta text")  # a BOM is dropped
    (txt / "README.md").write_text("not a document")
    import datasets

    datasets.Dataset.from_dict({"text": ["h one", "h two"], "id": ["h1", "h2"]}).save_to_disk(str(tmp_path / "hf__ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t1"]}),
                          "test": datasets.Dataset.from_dict({"text": ["t2"]})}).save_to_disk(str(tmp_path / "dd"))
    jdir = tmp_path / "jdir"
    jdir.mkdir()
    write_jsonl(jdir / "x__1.jsonl", [{"text": "j1"}])
    write_jsonl(jdir / "y__2.jsonl.gz", [{"text": "j2"}])

    docs, c, sources, ignored = read_all([tmp_path / "w__pq.parquet", txt, tmp_path / "hf__ds",
                                          tmp_path / "dd", jdir])
    got = [(d.text, d.doc_id, d.domain, d.source) for d in docs]
    assert got == [
        ("p one", "p1", "w", "pq"), ("p two", "p2", "w", "pq"),
        ("alpha text", "a.txt", "books", "txt"), ("beta text", "sub/b.txt", "books", "txt"),
        ("h one", "h1", "hf", "ds"), ("h two", "h2", "hf", "ds"),
        ("t1", "dd/train:1", "dd", "dd/train"), ("t2", "dd/test:1", "dd", "dd/test"),
        ("j1", "1:1", "x", "1"), ("j2", "2:1", "y", "2"),
    ]
    assert [s.kind for s in sources] == ["parquet", "txtdir", "arrow", "arrow", "arrow", "jsonl", "jsonl"]
    assert ignored == [txt / "README.md"]
    assert c.docs_in == 11 and dict(c.skipped) == {"missing_text": 1}


def test_bad_records_counted_per_reason(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b"{not json",
        b"[1, 2]",
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "  \n\t "}).encode(),
        b'{"text": "caf\xe9"}',  # latin-1 byte: invalid UTF-8
        b'{"text": "a\x00b"}',  # NUL byte: binary
        b'{"text": "lone \\ud800 surrogate"}',  # valid JSON, not encodable as UTF-8
        b"",  # an empty line is an (empty) document, never silently dropped
        json.dumps({"text": "good two", "id": 7}).encode(),
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    d = tmp_path / "t"
    d.mkdir()
    (d / "ok.txt").write_text("fine")
    (d / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (d / "latin.txt").write_bytes("déjà".encode("latin-1"))
    (d / "empty.txt").write_text("   ")
    docs, c, _, _ = read_all([p, d])
    assert [x.text for x in docs] == ["good one", "good two", "fine"]
    assert docs[1].doc_id == "7"
    assert dict(c.skipped) == {"invalid_json": 2, "missing_text": 1, "non_string_text": 1, "empty": 3,
                               "invalid_utf8": 3, "binary": 2}
    assert c.docs_in == len(lines) + 4 == len(docs) + c.docs_skipped
    assert c.examples[0] == f"{p}:2: invalid_json"


def test_fail_mode_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: text field is not a string"):
        read_all([p], on_error="fail")


def test_path_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        expand_inputs([tmp_path / "nope.jsonl"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported input format"):
        expand_inputs([tmp_path / "x.csv"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no .jsonl"):
        expand_inputs([empty])
    (tmp_path / "c.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot read"):
        read_all([tmp_path / "c.jsonl.gz"])
    (tmp_path / "c.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(UserError, match="zstd|cannot read"):
        read_all([tmp_path / "c.jsonl.zst"])
    (tmp_path / "c.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="not a readable parquet"):
        read_all([tmp_path / "c.parquet"])


def test_domain_field_and_missing_scores(tmp_path):
    p = write_jsonl(tmp_path / "mix.jsonl", [{"text": "a", "dom": "law", "s": "x"}, {"text": "b", "s": 1}])
    docs, c, _, _ = read_all([p], domain_field="dom", score_fields=("s",))
    assert [x.domain for x in docs] == ["law", "mix"]
    assert docs[0].scores[0] != docs[0].scores[0]  # NaN
    assert docs[1].scores == (1.0,)
    assert c.scores_missing == 1
