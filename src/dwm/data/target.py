"""LAMBADA-style target sets cut from held-out novels (`dwm target build`), and the helpers that read them.

Format (lm-eval `lambada_openai`): one `{"text": passage, "book": name}` per line. The target is the last
space-separated word of the passage: context = " ".join(words[:-1]), target = " " + words[-1].
`load_passages` and `split_context_target` are what the evaluator and the weighting model share, so a real
`lambada_openai` JSONL given by path is read exactly like the sets built here.

The passage filter (`extract_passages`), documented again in data/target/README.md:
  * a book is cut into segments at chapter headings (passages never cross a chapter), a segment into sentences
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
The split is by book (`REFERENCE_BOOKS` / `HELDOUT_BOOKS`); each set is capped at `max_per_set` (1000)
passages by an evenly spaced, deterministic selection in reading order, so CPU evaluation stays quick.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from dwm.errors import UserError

# Held-out novels: none of these appear in the training corpus (dwm.data.corpus excludes them).
REFERENCE_BOOKS: tuple[str, ...] = ("emma", "northangerabbey")
HELDOUT_BOOKS: tuple[str, ...] = ("persuasion", "mobydick")
HELD_OUT_BOOKS: tuple[str, ...] = REFERENCE_BOOKS + HELDOUT_BOOKS

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


# --------------------------------------------------------------------------------------------------- shared API
def split_context_target(text: str) -> tuple[str, str]:
    """(context, target) as lm-eval's lambada_openai: the target is the last space-separated word, with its
    leading space; the context is every word before it (lm-eval's doc_to_text / doc_to_target)."""
    words = text.split(" ")  # exactly lm-eval's text.split(' '), so scores are comparable
    if len(words) < 2 or not words[-1].strip() or not " ".join(words[:-1]).strip():
        raise UserError(f"a LAMBADA passage needs >= 2 space-separated words, got {text[:60]!r}")
    return " ".join(words[:-1]), " " + words[-1]


def _json_lines(p: Path):
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON object is a
    UserError naming file:line."""
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{p}:{n}: expected a JSON object with a \"text\" field")
            yield n, obj


def load_passages(path: str | Path) -> list[str]:
    """Passages of a LAMBADA-format JSONL (ours or a real `lambada_openai` file).
    Each non-blank line must be a JSON object with a non-empty string "text" of >= 2 words; anything else is a
    UserError naming file:line, because a silently dropped passage changes the reported accuracy."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"target file not found: {p}")
    out: list[str] = []
    for n, obj in _json_lines(p):
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{p}:{n}: missing or empty string field \"text\"")
        if len(text.split()) < 2:
            raise UserError(f"{p}:{n}: \"text\" needs at least 2 words (context + target)")
        out.append(text)
    if not out:
        raise UserError(f"{p}: no passages")
    return out


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
        for n, obj in _json_lines(p):
            if not isinstance(obj.get("text"), str):
                raise UserError(f"{p}:{n}: expected an object with a string \"text\"")
            name = obj.get("book") or str(obj.get("id", p.stem)).split("#", 1)[0]
            books.setdefault(str(name).lower(), []).append(obj["text"])
    return {k: "\n\n".join(v) for k, v in books.items()}


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build"], help="build reference.jsonl and heldout.jsonl")
    p.add_argument("--out", default="data/target", help="output directory (default: data/target)")
    p.add_argument("--input", nargs="+", default=None, metavar="JSONL_OR_TXT",
                   help="book files (.txt: one book named by the stem; .jsonl: rows with text + book or id). "
                        "Default: fetch the held-out novels with the package clients into --cache")
    p.add_argument("--cache", default="corpus-build", help="package cache used when --input is not given")
    p.add_argument("--reference-books", default=",".join(REFERENCE_BOOKS))
    p.add_argument("--heldout-books", default=",".join(HELDOUT_BOOKS))
    p.add_argument("--min-words", type=int, default=40)
    p.add_argument("--max-words", type=int, default=120)
    p.add_argument("--max-per-set", type=int, default=1000)
    p.add_argument("--no-require-in-context", action="store_true",
                   help="do not require the target to occur earlier in the passage")


def run(args: argparse.Namespace) -> int:
    if args.min_words < 2 or args.max_words < args.min_words or args.max_per_set < 1:
        raise UserError("need 2 <= --min-words <= --max-words and --max-per-set >= 1")
    if args.input:
        books = read_books(args.input)
    else:
        from dwm.data.corpus import held_out_books

        books = held_out_books(Path(args.cache))
    flt = PassageFilter(args.min_words, args.max_words, 3, not args.no_require_in_context)
    ref = tuple(b.strip().lower() for b in args.reference_books.split(",") if b.strip())
    held = tuple(b.strip().lower() for b in args.heldout_books.split(",") if b.strip())
    sets = build_sets(books, ref, held, flt, args.max_per_set)
    out = Path(args.out)
    for name, rows in sets.items():
        if not rows:
            raise UserError(f"{name} set is empty: no passage passed the filter")
        write_jsonl(rows, out / f"{name}.jsonl")
        per_book = {}
        for r in rows:
            per_book[r["book"]] = per_book.get(r["book"], 0) + 1
        print(f"{out / (name + '.jsonl')}: {len(rows)} passages "
              + ", ".join(f"{b}={n}" for b, n in per_book.items()))
    return 0
