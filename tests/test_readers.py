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
    p = write_jsonl(tmp_path / "mix.jsonl", [{"text": "a", "dom": "law", "s": "x"}, {"text": "b", "s": 1},
                                             {"text": "c", "dom": "news", "s": 2}])
    docs, c, _, _ = read_all([p], domain_field="dom", score_fields=("s",))
    assert [x.domain for x in docs] == ["law", "news"]  # the record without the field is skipped, not "mix"
    assert c.skipped == {"missing_domain": 1} and c.examples == [f"{p}:2: missing_domain"]
    assert docs[0].scores[0] != docs[0].scores[0]  # NaN
    assert docs[1].scores == (2.0,)
    assert c.scores_missing == 1


def test_dotted_domain_field_nested_json_and_parquet_struct(tmp_path):
    recs = [{"text": "a", "meta": {"redpajama_set_name": "RedPajamaC4"}},
            {"text": "b", "meta": {"redpajama_set_name": 7}},  # not a string
            {"text": "c", "meta": {"redpajama_set_name": ["x"]}},  # not a string
            {"text": "d", "meta": {"other": "x"}},  # missing
            {"text": "e", "meta": None},  # missing
            {"text": "f", "meta": {"redpajama_set_name": ""}},  # empty counts as missing
            {"text": "g", "meta.flat": "Flat"},  # a key holding a dot is matched as is
            {"text": "h", "meta": {"redpajama_set_name": "RedPajamaGithub"}}]
    p = write_jsonl(tmp_path / "sp.jsonl.zst", recs)
    docs, c, _, _ = read_all([p], domain_field="meta.redpajama_set_name")
    assert [(d.text, d.domain) for d in docs] == [("a", "RedPajamaC4"), ("h", "RedPajamaGithub")]
    assert c.docs_in == 8 and c.skipped == {"non_string_domain": 2, "missing_domain": 4}
    docs, c, _, _ = read_all([p], domain_field="meta.flat")
    assert [(d.text, d.domain) for d in docs] == [("g", "Flat")]
    # parquet: a struct column read as a nested object
    t = pa.table({"text": ["x", "y", "z"], "meta": [{"set": "Book", "n": 1}, {"set": None, "n": 2},
                                                    {"set": "ArXiv", "n": 3}]})
    pq.write_table(t, tmp_path / "sp.parquet")
    docs, c, _, _ = read_all([tmp_path / "sp.parquet"], domain_field="meta.set")
    assert [(d.text, d.domain) for d in docs] == [("x", "Book"), ("z", "ArXiv")]
    assert c.skipped == {"missing_domain": 1}
    with pytest.raises(UserError, match=r"'meta\.sets' is missing in all 3 records \(fields found: text, meta, "
                                        r"meta\.set, meta\.n\) \(did you mean meta\.set\?\)"):
        read_all([tmp_path / "sp.parquet"], domain_field="meta.sets")


def test_domain_field_missing_everywhere_stops_with_the_fields_found(tmp_path):
    from dwm.data.readers import DOMAIN_PROBE

    recs = [{"text": f"t{i}", "meta": {"redpajama_set_name": "RedPajamaC4"}} for i in range(5)]
    p = write_jsonl(tmp_path / "small.jsonl", recs)
    with pytest.raises(UserError) as e:  # all 5 lack the (misspelt) field: stops at the end of the file
        read_all([p], domain_field="meta.redpajama_setname")
    msg = str(e.value)
    assert "\n" not in msg and msg == (f"{p}: --domain-field 'meta.redpajama_setname' is missing in all 5 records "
                                       "(fields found: text, meta, meta.redpajama_set_name) "
                                       "(did you mean meta.redpajama_set_name?)")
    # a large file stops after the first DOMAIN_PROBE records, not at its end
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"t{i}", "set": "a"} for i in range(DOMAIN_PROBE + 50)])
    counter, seen = SkipCounter(), []
    with pytest.raises(UserError, match=f"big.jsonl:{DOMAIN_PROBE}: --domain-field 'sett' is missing in the first "
                                        f"{DOMAIN_PROBE} records .* \\(did you mean set\\?\\)"):
        seen.extend(iter_documents(expand_inputs([big])[0][0], ReadOptions(domain_field="sett"), counter))
    assert seen == [] and counter.docs_in == DOMAIN_PROBE
    # once found, a later record without it is only a counted skip; --on-error fail stops at the first
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "set": "x"}, {"text": "b"}])
    docs, c, _, _ = read_all([mixed], domain_field="set")
    assert len(docs) == 1 and c.skipped == {"missing_domain": 1}
    with pytest.raises(UserError, match="mixed.jsonl:2: domain field .* missing"):
        read_all([mixed], domain_field="set", on_error="fail")
    with pytest.raises(UserError, match="small.jsonl:1: --domain-field 'sett' is missing in the first record"):
        read_all([p], domain_field="sett", on_error="fail")


def test_directories_walk_recursively_and_same_named_files_get_distinct_sources(tmp_path):
    for chunk in ("chunk1", "chunk2"):
        (tmp_path / "train" / chunk).mkdir(parents=True)
        for k in range(2):
            write_jsonl(tmp_path / "train" / chunk / f"example_train_{k}.jsonl.zst", [{"text": f"{chunk} {k}"}])
    write_jsonl(tmp_path / "train" / "web__cc.jsonl", [{"text": "w"}])
    docs, _, sources, _ = read_all([tmp_path / "train"])
    assert [s.source for s in sources] == ["chunk1/example_train_0", "chunk1/example_train_1",
                                           "chunk2/example_train_0", "chunk2/example_train_1", "cc"]
    assert [d.doc_id for d in docs][:2] == ["chunk1/example_train_0:1", "chunk1/example_train_1:1"]
    assert len({d.doc_id for d in docs}) == 5 and sources[0].domain == "example_train_0"
    # a prepared directory (another shard's output) inside an input directory is never read as input
    out = tmp_path / "train" / "shard0"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"format": "dwm-prepared/1"}))
    pq.write_table(pa.table({"text": ["x"]}), out / "train.parquet")
    assert [s.source for s in read_all([tmp_path / "train"])[2]] == [s.source for s in sources]
    (out / "meta.json").write_text(json.dumps({"format": "something else"}))
    assert len(read_all([tmp_path / "train"])[2]) == len(sources) + 1
