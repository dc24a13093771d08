"""The LAMBADA-style target: the passage filter, the split, the shipped files and the shared readers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dwm.data.passages import HELDOUT_BOOKS, REFERENCE_BOOKS, load_passages, split_context_target
from dwm.data.target import (
    STOP_WORDS,
    PassageFilter,
    build_sets,
    extract_passages,
    read_books,
    split_sentences,
)
from dwm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "data" / "target"

_NAMES = ["Harriet", "Edmund", "Marianne", "Willoughby", "Catherine", "Frederick", "Wentworth", "Isabella"]
_NOUNS = ["garden", "letter", "carriage", "window", "ribbon", "parlour", "journey", "portrait", "orchard"]
_FILL = ("the walk was long and the weather was kind to them all that morning".split()  # noqa: SIM905
         + "she could not think of any reason to refuse the invitation".split())  # noqa: SIM905


def make_book(seed: int, n_chapters: int = 3, n_sents: int = 60) -> str:
    """A synthetic novel: chapters of sentences that end in a name, noun, stop word, number or quoted word."""
    rng = random.Random(seed)
    chapters = []
    for c in range(n_chapters):
        paras, para = [], []
        for _ in range(n_sents):
            body = " ".join(rng.choice(_FILL) for _ in range(rng.randint(6, 16)))
            end = rng.choice(_NAMES + _NOUNS + ["them", "1815", "Mrs. Smith", "well-known", "O'Brien", "HARRIET"])
            punct = rng.choice([".", "!", "?", ".\"", "!'"])
            para.append(f"{body.capitalize()} {end}{punct}")
            if rng.random() < 0.25:
                paras.append(" ".join(para))
                para = []
        paras.append(" ".join(para))
        chapters.append(f"CHAPTER {c + 1}\n\n" + "\n\n".join(paras))
    return "\n\n".join(chapters)


def test_split_context_target_matches_lm_eval():
    assert split_context_target("the cat sat on the mat") == ("the cat sat on the", " mat")
    # lm-eval splits on single spaces, so a doubled space survives in the context
    assert split_context_target("a  b c") == ("a  b", " c")
    with pytest.raises(UserError):
        split_context_target("alone")


def test_sentence_split_keeps_abbreviations():
    s = split_sentences('Mr. Knightley came in. "Is it you?" she asked. Yes! It was St. John.')
    assert s == ["Mr. Knightley came in.", '"Is it you?"', "she asked.", "Yes!", "It was St. John."]


@pytest.mark.parametrize("in_context", [True, False])
def test_passage_filter_properties(in_context: bool):
    flt = PassageFilter(min_words=30, max_words=80, min_target_len=3, require_in_context=in_context)
    book = make_book(1)
    passages = extract_passages(book, flt)
    assert len(passages) >= 5
    for p in passages:
        words = p.split(" ")
        assert flt.min_words <= len(words) <= flt.max_words
        ctx, tgt = split_context_target(p)
        t = tgt[1:]
        assert t.isascii() and t.isalpha() and len(t) >= 3, p
        assert t.lower() not in STOP_WORDS and not t.isupper()
        assert p.endswith(t) and p == ctx + tgt  # the passage ends with the bare word
        assert "CHAPTER" not in p  # never crosses a chapter heading
        # a passage is whole sentences: it starts at a sentence start of the book
        assert p[0].isupper() or p[0] in "\"'"
        if in_context:
            ctx_words = {w.strip(".,!?;:\"'").lower() for w in ctx.split()}
            assert t.lower() in ctx_words
    # no overlap: every passage's text occurs once and they appear in reading order
    flat = " ".join(book.split())
    pos = [flat.find(p[: len(p) - len(split_context_target(p)[1])]) for p in passages]
    assert all(x >= 0 for x in pos) and pos == sorted(pos)
    for a, b, pa in zip(pos, pos[1:], passages):
        assert a + len(pa) <= b


def test_require_in_context_is_stricter():
    book = make_book(2)
    loose = extract_passages(book, PassageFilter(30, 80, 3, False))
    strict = extract_passages(book, PassageFilter(30, 80, 3, True))
    assert len(strict) < len(loose)


def test_build_sets_deterministic_and_disjoint():
    books = {b: make_book(i, n_chapters=4) for i, b in enumerate(REFERENCE_BOOKS + HELDOUT_BOOKS)}
    flt = PassageFilter(30, 80, 3, True)
    a = build_sets(books, flt=flt, max_per_set=20)
    b = build_sets(dict(reversed(list(books.items()))), flt=flt, max_per_set=20)
    assert a == b
    assert 0 < len(a["reference"]) <= 20 and 0 < len(a["heldout"]) <= 20
    assert {r["book"] for r in a["reference"]} == set(REFERENCE_BOOKS)
    assert {r["book"] for r in a["heldout"]} == set(HELDOUT_BOOKS)
    assert not {r["text"] for r in a["reference"]} & {r["text"] for r in a["heldout"]}
    with pytest.raises(UserError, match="both sets"):
        build_sets(books, ("emma",), ("emma",))
    with pytest.raises(UserError, match="not found"):
        build_sets({"emma": books["emma"]})


def test_cli_build_from_txt_inputs(tmp_path: Path):
    from dwm.cli import main

    for i, b in enumerate(("alpha", "beta")):
        (tmp_path / f"{b}.txt").write_text(make_book(10 + i))
    out = tmp_path / "out"
    argv = ["target", "build", "--input", str(tmp_path / "alpha.txt"), str(tmp_path / "beta.txt"),
            "--out", str(out), "--reference-books", "alpha", "--heldout-books", "beta", "--min-words", "30"]
    assert main(argv) == 0
    first = (out / "reference.jsonl").read_bytes()
    assert main(argv) == 0
    assert (out / "reference.jsonl").read_bytes() == first
    assert {json.loads(x)["book"] for x in first.decode().splitlines()} == {"alpha"}
    assert main(["target", "build", "--input", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2


def test_read_books_jsonl(tmp_path: Path):
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"id": "emma#0", "text": "One."}) + "\n" + json.dumps({"book": "x", "text": "Two."}) + "\n")
    assert read_books([f]) == {"emma": "One.", "x": "Two."}
    f.write_text("{not json\n")
    with pytest.raises(UserError, match=r"b.jsonl:1"):
        read_books([f])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"text": "a b"}\nnot json\n', r"bad.jsonl:2: not valid JSON"),
        ('["a b"]\n', r"bad.jsonl:1: expected a JSON object"),
        ('{"text": ""}\n', r"bad.jsonl:1: missing or empty"),
        ('{"txt": "a b"}\n', r"bad.jsonl:1: missing or empty"),
        ('{"text": 5}\n', r"bad.jsonl:1: missing or empty"),
        ('{"text": "oneword"}\n', r"bad.jsonl:1: .*at least 2 words"),
        ("\n\n", r"no passages"),
    ],
)
def test_load_passages_bad_input(tmp_path: Path, content: str, match: str):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(UserError, match=match):
        load_passages(f)


def test_load_passages_missing_file(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        load_passages(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------------------------- the shipped files
def _rows(name: str) -> list[dict]:
    return [json.loads(x) for x in (TARGET / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_shipped_target_files_valid_and_disjoint():
    ref, held = _rows("reference"), _rows("heldout")
    assert 100 <= len(ref) <= 1000 and 100 <= len(held) <= 1000
    assert {r["book"] for r in ref} == set(REFERENCE_BOOKS)
    assert {r["book"] for r in held} == set(HELDOUT_BOOKS)
    assert not {r["text"] for r in ref} & {r["text"] for r in held}
    for rows, name in ((ref, "reference"), (held, "heldout")):
        assert load_passages(TARGET / f"{name}.jsonl") == [r["text"] for r in rows]
        assert len({r["text"] for r in rows}) == len(rows)
        for r in rows:
            assert set(r) == {"text", "book"}
            n = len(r["text"].split(" "))
            assert 40 <= n <= 120
            t = split_context_target(r["text"])[1][1:]
            assert t.isascii() and t.isalpha() and len(t) >= 3 and t.lower() not in STOP_WORDS


# --- dwm target build --from: any text, split by document --------------------------------------------------
def _write_docs(path: Path, docs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))
    return path


def test_target_from_documents_filter_split_and_overlap(tmp_path: Path, capsys):
    from dwm.cli import main
    from dwm.data.prepare import is_val

    docs = [(f"doc{i}", make_book(100 + i, n_chapters=1, n_sents=40)) for i in range(12)]
    speech = _write_docs(tmp_path / "speech__mine.jsonl", docs)
    _write_docs(tmp_path / "code__other.jsonl", [("c1", make_book(999, 1, 40))])  # another domain: ignored
    out = tmp_path / "t"
    assert main(["target", "build", "--from", str(tmp_path), "--domain", "speech", "--out", str(out),
                 "--train", str(tmp_path / "code__other.jsonl")]) == 0
    sets = {n: [json.loads(x) for x in (out / f"{n}.jsonl").read_text().splitlines()] for n in ("reference",
                                                                                                 "heldout")}
    # the same filter as the novels: every passage is one that extract_passages cuts from its document
    by_id = dict(docs)
    for name, rows in sets.items():
        assert rows, name
        for r in rows:
            assert r["text"] in extract_passages(by_id[r["doc_id"]]) and r["domain"] == "speech"
            assert (name == "heldout") == is_val(r["doc_id"], 0, 0.5)  # split by document, seeded hash
    assert not {r["doc_id"] for r in sets["reference"]} & {r["doc_id"] for r in sets["heldout"]}
    assert load_passages(out / "heldout.jsonl") == [r["text"] for r in sets["heldout"]]
    # refused when the training data holds a target document: by id in a prepared dir, by text in raw inputs
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "meta.json").write_text("{}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc_id": ["x", "doc3"]}), prep / "train.parquet")
    capsys.readouterr()
    assert main(["target", "build", "--from", str(speech), "--out", str(tmp_path / "t2"), "--train", str(prep)]) == 2
    err = capsys.readouterr().err
    assert "1 of the 12 target documents are in the training data (e.g. doc3)" in err and err.count("\n") == 1
    copy = _write_docs(tmp_path / "renamed.jsonl", [("other-id", docs[5][1])])
    assert main(["target", "build", "--from", str(speech), "--out", str(tmp_path / "t3"), "--train", str(copy)]) == 2
    assert "e.g. doc5" in capsys.readouterr().err
    assert not (tmp_path / "t2").exists() and not (tmp_path / "t3").exists()


@pytest.mark.parametrize("case, match", [
    ("empty", "no documents in"),
    ("nopassage", "passed the filter"),
    ("unreadable", "unsupported input format"),
    ("missing", "does not exist"),
    ("onedoc", "set is empty"),
])
def test_target_from_bad_input_is_one_line(tmp_path: Path, capsys, case: str, match: str):
    from dwm.cli import main

    p = {"empty": tmp_path / "e.jsonl", "nopassage": tmp_path / "n.jsonl", "unreadable": tmp_path / "x.bin",
         "missing": tmp_path / "nope.jsonl", "onedoc": tmp_path / "o.jsonl"}[case]
    if case == "empty":
        p.write_text("")
    elif case == "nopassage":
        _write_docs(p, [("a", "Short text. Nothing here ends well 1815."), ("b", "Too short.")])
    elif case == "unreadable":
        p.write_bytes(b"\x00\x01binary")
    elif case == "onedoc":
        _write_docs(p, [("only", make_book(7, 1, 40))])
    rc = main(["target", "build", "--from", str(p), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.strip().count("\n") <= 1 and "Traceback" not in err
