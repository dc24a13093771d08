"""`dwm target build`: LAMBADA-format target sets, from held-out novels (split by book) or from any text a user
brings (`--from`, split by document). The format and its readers live in `dwm.data.passages`.

Three inputs:
  * default: the shipped target's novels (`dwm.data.passages.REFERENCE_BOOKS` / `HELDOUT_BOOKS`), fetched with the
    package clients by the maintainers' tool tools/corpus.py (a repository checkout);
  * `--input BOOK...`: novels from .txt / .jsonl files, split into reference / heldout *by book*;
  * `--from FILE_OR_DIR... [--domain D]`: documents of any JSONL / .txt / parquet input (read as `dwm prepare`
    reads them), split into reference / heldout *by document* (a seeded hash of the document id, so a document's
    passages never straddle the two sets); `--train DIR_OR_INPUT...` names the training data, and the build is
    refused if any target document is in it (same document id; for raw inputs also identical text).

The passage filter (`extract_passages`), documented again in data/target/README.md:
  * a text is cut into segments at chapter headings (passages never cross a chapter), a segment into sentences
    (split after . ! ? and an optional closing quote/bracket, not after Mr./Mrs./Dr./St. and similar);
  * a passage is a run of whole consecutive sentences; its last sentence ends in the target word. The sentence's
    closing punctuation is stripped, as LAMBADA does, so the passage ends with the bare word;
  * the target is alphabetic (ASCII letters only: no digits, apostrophes, hyphens or underscores), has
    >= `min_target_len` (3) letters, is not a stop word and is not all capitals (speaker tags, headings);
  * the passage has `min_words`..`max_words` (40..120) words: sentences are added backwards from the last one
    until `min_words` is reached; if that overshoots `max_words` the candidate is dropped;
  * by default (`require_in_context=True`) the target (case-insensitive) must occur earlier in the passage,
    but not in the last sentence: LAMBADA's passages are ones where the broad context, not the last sentence,
    gives the word away. This also makes the task learnable by small models, which is what the weighting
    model needs as a signal;
  * passages do not overlap (a greedy scan in reading order), and the result is deterministic.
Each set is capped at `max_per_set` (1000) passages by an evenly spaced, deterministic selection in reading
order, so CPU evaluation stays quick.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from dwm.data.passages import HELDOUT_BOOKS, REFERENCE_BOOKS, json_lines
from dwm.data.readers import Document, ReadOptions, SkipCounter, expand_inputs, iter_documents
from dwm.errors import UserError

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her here
    hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
    off on once only or other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up upon very was we were
    what when where which while who whom why will with would you your yours yourself yourselves shall may might
    must one also yet said say says mr mrs miss sir""".split()  # noqa: SIM905
)
_ABBREV = frozenset("mr mrs ms dr st messrs capt col gen rev sr jr mt no vol ch".split())  # noqa: SIM905
_HEADING = re.compile(r"^\s*(chapter|volume|book|part)\b[^\n]*$|^\s*[A-Z0-9 .,:;'\-]+\s*$", re.IGNORECASE)
_SENT_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_TRAIL = "\"'\u201d\u2019)]}.,!?;:-\u2014_*"


# ----------------------------------------------------------------------------------------------- the filter
@dataclass(frozen=True)
class PassageFilter:
    min_words: int = 40
    max_words: int = 120
    min_target_len: int = 3
    require_in_context: bool = True


def _clean_word(w: str) -> str:
    return w.strip(_TRAIL + "\"'\u201c\u2018([{").lower()


def split_sentences(segment: str) -> list[str]:
    """Sentences of one whitespace-normalised segment; no split after common abbreviations (Mr. Knightley)."""
    text = " ".join(segment.split())
    sents: list[str] = []
    start = 0
    for m in _SENT_END.finditer(text):
        end = m.end()
        before = text[start : m.start()].rsplit(" ", 1)[-1]
        if m.group().startswith(".") and len(m.group()) == 1:
            tok = before.strip("\"'\u201c\u2018(").lower()
            if tok in _ABBREV or (len(tok) == 1 and tok.isalpha()):
                continue
        s = text[start:end].strip()
        if s:
            sents.append(s)
        start = end
    tail = text[start:].strip()
    if tail:
        sents.append(tail)
    return sents


def segments(book_text: str) -> list[str]:
    """Chapters (runs of paragraphs between heading-like lines), each whitespace-normalised."""
    segs: list[list[str]] = [[]]
    for para in re.split(r"\n\s*\n", book_text):
        p = para.strip()
        if not p:
            continue
        if len(p) < 80 and _HEADING.match(p) and not any(c in p for c in "!?"):
            if segs[-1]:
                segs.append([])
            continue
        segs[-1].append(" ".join(p.split()))
    return [" ".join(s) for s in segs if s]


def _target_of(sentence: str, flt: PassageFilter) -> tuple[str, str] | None:
    """(sentence with its closing punctuation stripped, target) or None if the last word does not qualify."""
    body = sentence.rstrip(_TRAIL + " ")
    if not body:
        return None
    last = body.rsplit(" ", 1)[-1]
    if not (last.isascii() and last.isalpha()) or len(last) < flt.min_target_len:
        return None
    if last.lower() in STOP_WORDS or (last.isupper() and len(last) > 1):  # all caps: a speaker tag or heading
        return None
    return body, last


def extract_passages(book_text: str, flt: PassageFilter = PassageFilter()) -> list[str]:
    """Non-overlapping LAMBADA-style passages of one book, in reading order (see the module docstring)."""
    out: list[str] = []
    for seg in segments(book_text):
        sents = split_sentences(seg)
        lens = [len(s.split()) for s in sents]
        next_free = 0  # first sentence a new passage may use (no overlap)
        for i in range(len(sents)):
            if i < next_free:
                continue
            t = _target_of(sents[i], flt)
            if t is None:
                continue
            last_body, target = t
            total, j = len(last_body.split()), i
            while total < flt.min_words and j > next_free:
                j -= 1
                total += lens[j]
            if total < flt.min_words or total > flt.max_words:
                continue
            if flt.require_in_context:
                low = target.lower()
                ctx_words = {_clean_word(w) for s in sents[j:i] for w in s.split()}
                last_words = {_clean_word(w) for w in last_body.split()[:-1]}
                if low not in ctx_words or low in last_words:
                    continue
            passage = " ".join(sents[j:i] + [last_body])
            out.append(passage)
            next_free = i + 1
    return out


def _even_cap(items: list, cap: int) -> list:
    """At most `cap` items, evenly spaced over the list (deterministic, keeps reading order)."""
    if len(items) <= cap:
        return list(items)
    return [items[(k * len(items)) // cap] for k in range(cap)]


def build_sets(
    books: dict[str, str],
    reference_books: tuple[str, ...] = REFERENCE_BOOKS,
    heldout_books: tuple[str, ...] = HELDOUT_BOOKS,
    flt: PassageFilter = PassageFilter(),
    max_per_set: int = 1000,
) -> dict[str, list[dict[str, str]]]:
    """{"reference": rows, "heldout": rows} with rows {"text", "book"}; disjoint by book, capped per set
    with an even share per book (a long book cannot crowd out the others)."""
    if set(reference_books) & set(heldout_books):
        raise UserError(f"a book cannot be in both sets: {sorted(set(reference_books) & set(heldout_books))}")
    result: dict[str, list[dict[str, str]]] = {}
    for name, names in (("reference", reference_books), ("heldout", heldout_books)):
        missing = [b for b in names if b not in books]
        if missing:
            raise UserError(f"{name} set: book(s) not found in the input: {', '.join(missing)} "
                            f"(have: {', '.join(sorted(books)) or 'none'})")
        per_book = {b: extract_passages(books[b], flt) for b in names}
        share = max_per_set // len(names)
        rows: list[dict[str, str]] = []
        for k, b in enumerate(names):
            # later books may take what earlier ones left unused
            room = max_per_set - len(rows) - share * (len(names) - k - 1)
            rows += [{"text": p, "book": b} for p in _even_cap(per_book[b], max(room, share))]
        result[name] = rows
    ref_texts = {r["text"] for r in result["reference"]}
    result["heldout"] = [r for r in result["heldout"] if r["text"] not in ref_texts]
    return result


# ------------------------------------------------------------------------------------------------- inputs
def read_books(paths: list[str | Path]) -> dict[str, str]:
    """Books from files: `.txt` -> one book named by the file stem; `.jsonl` -> rows {"text", "book"} (or
    {"text", "id"} where the id's part before '#' names the book), texts of one book joined in file order."""
    books: dict[str, list[str]] = {}
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"input not found: {p}")
        if p.suffix == ".txt":
            books.setdefault(p.stem.lower(), []).append(p.read_text(encoding="utf-8", errors="replace"))
            continue
        for n, obj in json_lines(p):
            if not isinstance(obj.get("text"), str):
                raise UserError(f"{p}:{n}: expected an object with a string \"text\"")
            name = obj.get("book") or str(obj.get("id", p.stem)).split("#", 1)[0]
            books.setdefault(str(name).lower(), []).append(obj["text"])
    return {k: "\n\n".join(v) for k, v in books.items()}


def read_documents(paths: list[str | Path], domain: str | None = None, opts: ReadOptions | None = None
                   ) -> tuple[list[Document], SkipCounter]:
    """Documents of any `dwm prepare` input (JSONL[.gz|.zst], .txt, parquet, directories), optionally only one
    domain's; bad records are counted (or raise with on_error="fail")."""
    sources, _ = expand_inputs(list(paths))
    counter = SkipCounter()
    docs = [d for s in sources for d in iter_documents(s, opts or ReadOptions(), counter)
            if domain is None or d.domain == domain]
    return docs, counter


def build_from_documents(docs: list[Document], heldout_fraction: float = 0.5, seed: int = 0,
                         flt: PassageFilter = PassageFilter(), max_per_set: int = 1000
                         ) -> dict[str, list[dict[str, str]]]:
    """{"reference": rows, "heldout": rows}, rows {"text", "doc_id", "domain"}: every document's passages go to
    the set its id hashes to (heldout with probability heldout_fraction), each set capped evenly."""
    from dwm.data.prepare import is_val  # the same seeded document hash as the train/val split

    sets: dict[str, list[dict[str, str]]] = {"reference": [], "heldout": []}
    for d in docs:
        name = "heldout" if is_val(d.doc_id, seed, heldout_fraction) else "reference"
        sets[name] += [{"text": t, "doc_id": d.doc_id, "domain": d.domain} for t in extract_passages(d.text, flt)]
    return {k: _even_cap(v, max_per_set) for k, v in sets.items()}


def training_overlap(docs: list[Document], train: list[str | Path]) -> list[str]:
    """Ids of target documents that the training data holds: a prepared directory by document id; raw inputs by
    document id or identical (whitespace-normalised) text."""
    import hashlib

    import pyarrow.parquet as pq

    def key(text: str) -> str:
        return hashlib.sha1(" ".join(text.split()).encode("utf-8", "surrogatepass")).hexdigest()

    ids: set[str] = set()
    texts: set[str] = set()
    raw: list[str | Path] = []
    for t in train:
        p = Path(t)
        if (p / "meta.json").is_file():
            from dwm.data.dataset import POOL_FORMAT, pool_shards

            is_pool = json.loads((p / "meta.json").read_text()).get("format") == POOL_FORMAT
            for sd in [d for d, _ in pool_shards(p)] if is_pool else [p]:  # a pool: its shards' parquet files
                for f in sorted(sd.glob("*.parquet")):
                    ids.update(pq.read_table(f, columns=["doc_id"]).column("doc_id").to_pylist())
        else:
            raw.append(p)
    if raw:
        for d in read_documents(raw)[0]:
            ids.add(d.doc_id)
            texts.add(key(d.text))
    return [d.doc_id for d in docs if d.doc_id in ids or (texts and key(d.text) in texts)]


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build"], help="build reference.jsonl and heldout.jsonl")
    p.add_argument("--out", default="data/target", help="output directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--input", nargs="+", default=None, metavar="JSONL_OR_TXT",
                   help="book files, split by book (.txt: one book named by the stem; .jsonl: rows with text + book "
                        "or id). Default: fetch the shipped target's novels into --cache (needs a repository "
                        "checkout: tools/corpus.py)")
    g.add_argument("--from", dest="from_", nargs="+", default=None, metavar="FILE_OR_DIR",
                   help="any text: documents of JSONL[.gz|.zst] / .txt / parquet files or directories (read as dwm "
                        "prepare reads them), split into reference / heldout by document")
    p.add_argument("--domain", default=None, help="with --from: only documents of this domain (the <domain> of "
                                                  "<domain>__<source> file names, or --domain-field)")
    p.add_argument("--domain-field", default=None, help="with --from: take the domain from this record field")
    p.add_argument("--text-field", default="text", help="with --from: record field holding the text")
    p.add_argument("--id-field", default="id", help="with --from: document id field (else <source>:<line>)")
    p.add_argument("--heldout-fraction", type=float, default=0.5,
                   help="with --from: share of documents (by a seeded hash of the id) whose passages are heldout")
    p.add_argument("--seed", type=int, default=0, help="with --from: seed of the document split")
    p.add_argument("--train", nargs="+", default=None, metavar="DIR_OR_INPUT",
                   help="with --from: the training data (prepared directories or raw inputs); the build is refused "
                        "if any target document is in it (default: not checked, with a warning)")
    p.add_argument("--cache", default="corpus-build", help="package cache used when neither --input nor --from")
    p.add_argument("--reference-books", default=",".join(REFERENCE_BOOKS), help="books of the reference set")
    p.add_argument("--heldout-books", default=",".join(HELDOUT_BOOKS), help="books of the heldout set")
    p.add_argument("--min-words", type=int, default=40, help="shortest passage, in words")
    p.add_argument("--max-words", type=int, default=120, help="longest passage, in words")
    p.add_argument("--max-per-set", type=int, default=1000, help="passages per set at most (evenly spaced)")
    p.add_argument("--no-require-in-context", action="store_true",
                   help="do not require the target to occur earlier in the passage")


def _sets_from_documents(args: argparse.Namespace, flt: PassageFilter) -> dict[str, list[dict[str, str]]]:
    if not 0 < args.heldout_fraction < 1:
        raise UserError(f"--heldout-fraction must be in (0, 1), got {args.heldout_fraction}")
    opts = ReadOptions(text_field=args.text_field, id_field=args.id_field, domain_field=args.domain_field)
    docs, counter = read_documents(args.from_, args.domain, opts)
    where = " ".join(map(str, args.from_)) + (f" (domain {args.domain})" if args.domain else "")
    if not docs:
        skipped = f"; {counter.docs_skipped} record(s) skipped as unreadable" if counter.docs_skipped else ""
        raise UserError(f"no documents in {where}{skipped}")
    if args.train:
        clash = training_overlap(docs, args.train)
        if clash:
            raise UserError(f"{len(clash)} of the {len(docs)} target documents are in the training data "
                            f"(e.g. {', '.join(clash[:3])}): hold them out of training first")
    else:
        print("dwm target build: warning: no --train given, so overlap with the training data was not checked",
              file=sys.stderr)
    sets = build_from_documents(docs, args.heldout_fraction, args.seed, flt, args.max_per_set)
    if not sets["reference"] and not sets["heldout"]:
        raise UserError(f"no passage of the {len(docs)} document(s) in {where} passed the filter "
                        f"({args.min_words}-{args.max_words} words ending in a qualifying target word)")
    return sets


def run(args: argparse.Namespace) -> int:
    if args.min_words < 2 or args.max_words < args.min_words or args.max_per_set < 1:
        raise UserError("need 2 <= --min-words <= --max-words and --max-per-set >= 1")
    flt = PassageFilter(args.min_words, args.max_words, 3, not args.no_require_in_context)
    if args.from_:
        sets = _sets_from_documents(args, flt)
        group = "doc_id"
    else:
        if args.input:
            books = read_books(args.input)
        else:
            from dwm.tools import load_tool

            books = load_tool("corpus").held_out_books(Path(args.cache))
        ref = tuple(b.strip().lower() for b in args.reference_books.split(",") if b.strip())
        held = tuple(b.strip().lower() for b in args.heldout_books.split(",") if b.strip())
        sets = build_sets(books, ref, held, flt, args.max_per_set)
        group = "book"
    out = Path(args.out)
    for name, rows in sets.items():
        if not rows:
            raise UserError(f"{name} set is empty: no passage passed the filter"
                            + (" in its documents (add documents or change --heldout-fraction)"
                               if group == "doc_id" else ""))
    for name, rows in sets.items():
        write_jsonl(rows, out / f"{name}.jsonl")
        groups: dict[str, int] = {}
        for r in rows:
            groups[r[group]] = groups.get(r[group], 0) + 1
        detail = (", ".join(f"{b}={n}" for b, n in groups.items()) if group == "book"
                  else f"from {len(groups)} documents")
        print(f"{out / (name + '.jsonl')}: {len(rows)} passages {detail}")
    return 0
