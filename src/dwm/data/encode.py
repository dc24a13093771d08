"""Encoding for `dwm prepare`: input sources -> (source index, documents, token ids) in input order, with bounded
memory. `chunks` cuts each source's documents into chunks of about CHUNK_BYTES, `tokenized` encodes them on a
thread pool with a bounded number in flight, `tokenized_ray` does the same as Ray Data tasks (one per source, the
same chunks and ids); `tokenizer_sample` is the bounded, deterministic text the BPE is trained on, and
`default_workers` the number of cores this process may use."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from dwm.data import tokenizer as tkz
from dwm.data.formats import InputSource
from dwm.data.prepare_options import PrepareOptions, is_val
from dwm.data.readers import Document, ReadOptions, SkipCounter, iter_documents
from dwm.progress import Progress

CHUNK_BYTES = 1 << 20  # text per tokenization task: large enough to amortise overhead, small for memory


def chunks(sources: list[InputSource], ropts: ReadOptions, counter: SkipCounter
            ) -> Iterator[tuple[int, list[Document]]]:
    """(source index, documents) chunks of about CHUNK_BYTES; a chunk never spans two sources."""
    for si, src in enumerate(sources):
        chunk: list[Document] = []
        size = 0
        for doc in iter_documents(src, ropts, counter):
            chunk.append(doc)
            size += doc.n_bytes
            if size >= CHUNK_BYTES or len(chunk) >= 4096:
                yield si, chunk
                chunk, size = [], 0
        if chunk:
            yield si, chunk


def tokenized(tok, chunks: Iterator[tuple[int, list[Document]]], workers: int
               ) -> Iterator[tuple[int, list[Document], list[list[int]]]]:
    """Tokenize chunks in order. With workers > 1, a thread pool (tokenizers releases the GIL while encoding)
    with at most 2*workers chunks in flight, so memory stays bounded and the order is the input order."""
    if workers <= 1:
        for si, docs in chunks:
            yield si, docs, tkz.encode_batch(tok, [d.text for d in docs])
        return
    pending: deque[tuple[int, list[Document], Future]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="dwm-tok") as ex:
        for si, docs in chunks:
            pending.append((si, docs, ex.submit(tkz.encode_batch, tok, [d.text for d in docs])))
            if len(pending) >= 2 * workers:
                si0, docs0, fut = pending.popleft()
                yield si0, docs0, fut.result()
        while pending:
            si0, docs0, fut = pending.popleft()
            yield si0, docs0, fut.result()


def _tokenize_source(task: tuple) -> tuple[list[tuple[list[Document], list[list[int]]]], SkipCounter]:
    """A Ray task: read one source, cut it into the local engine's chunks and tokenize them (the same chunks and
    ids as `tokenized`); returns them with the source's skip counter."""
    from tokenizers import Tokenizer

    src, ropts, tok_json = task
    tok = Tokenizer.from_str(tok_json)
    counter = SkipCounter()
    out = [(docs, tkz.encode_batch(tok, [d.text for d in docs])) for _, docs in chunks([src], ropts, counter)]
    return out, counter


def tokenized_ray(tok, sources: list[InputSource], ropts: ReadOptions, counter: SkipCounter, workers: int,
                   address: str | None) -> Iterator[tuple[int, list[Document], list[list[int]]]]:
    """`tokenized` as Ray Data tasks, one per input source (a source is the unit of parallelism: split a large
    input into several files to spread it), yielded in source order; the skip counters are merged in that order,
    so the prepared directory is byte-identical to the local engine's. With on_error = fail, a bad record's error
    is raised by its task."""
    from dwm.data import rayjobs

    started = rayjobs.start(workers, address)
    try:
        tok_json = tok.to_str()
        results = rayjobs.imap(_tokenize_source, [(s, ropts, tok_json) for s in sources])
        for si, (chunks, c) in enumerate(results):
            counter.docs_in += c.docs_in
            counter.skipped.update(c.skipped)
            counter.examples.extend(c.examples[: max(0, 20 - len(counter.examples))])
            counter.scores_missing += c.scores_missing
            for docs, ids in chunks:
                yield si, docs, ids
    finally:
        if started:
            rayjobs.stop()


def tokenizer_sample(sources: list[InputSource], opts: PrepareOptions, progress: Progress | None = None
                      ) -> Iterator[str]:
    """Bounded, deterministic training sample: the first share of each source's train documents (the document
    that fills the share is given whole). A document over tkz.PIECE_CHARS characters is given in pieces
    (tkz.iter_pieces: the same words) and only up to the share."""
    share = opts.tokenizer_sample_mb * 1e6 / len(sources)
    ropts = opts.read_options()
    for src in sources:
        taken = 0
        for doc in iter_documents(src, ropts, SkipCounter()):
            if is_val(doc.doc_id, opts.seed, opts.val_fraction):
                continue
            if len(doc.text) <= tkz.PIECE_CHARS:
                yield doc.text
                taken += doc.n_bytes
                if progress is not None:
                    progress.update(doc.n_bytes / 1e6)
            else:  # a very long document: its pieces until the source's share is taken
                for piece in tkz.iter_pieces(doc.text, tkz.PIECE_CHARS):
                    yield piece
                    n = len(piece.encode("utf-8", "surrogatepass"))
                    taken += n
                    if progress is not None:
                        progress.update(n / 1e6)
                    if taken >= share:
                        break
            if taken >= share:
                break


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
