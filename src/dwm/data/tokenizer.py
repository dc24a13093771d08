"""Tokenizers for `dwm prepare`: train a byte-level BPE, or load a tokenizer.json / HF tokenizer directory.

Byte-level BPE (GPT-2 style) because it never produces <unk>: every document, in any script or with any
stray byte, round-trips. Special tokens are "<|endoftext|>" (EOS, appended after every document) and
"<|pad|>" (fills the end of a short sample). A loaded tokenizer without a pad token pads with EOS: the
per-sample `n_tokens` column, not the pad id, says where the real tokens end.

BOS policy (tokens as the model will see them): a tokenizer either puts a BOS token before every text or not.
`bos_policy` reads it from a loaded tokenizer (an HF dir's tokenizer_config.json `bos_token` / `add_bos_token`,
else what its post-processor adds); the trained BPE has no BOS. `dwm prepare` records it in meta.json
(`bos_id`: int or null, `add_bos`: bool), prepends BOS to each document when `add_bos`, and saves the tokenizer
with a post-processor that adds exactly that prefix (`set_bos_policy`), so every later reader (the reference
passages, `dwm eval`, `dwm export`, transformers' AutoTokenizer of an export) encodes text as training saw it.
A prepared directory without the fields (written before) reads as "no BOS".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dwm.errors import UserError, read_json_object

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with EOS and PAD as special tokens (ids 0 and 1)."""
    if vocab_size < 258 + 2:
        raise UserError(f"--vocab-size must be at least 260 (256 bytes + 2 special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _config_value(d: Path, key: str) -> object:
    """A key of an HF tokenizer_config.json / special_tokens_map.json (first file that has it), else None."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = d / name
        if f.is_file():
            try:
                obj = json.loads(f.read_text())
            except ValueError:
                continue
            if isinstance(obj, dict) and key in obj:
                return obj[key]
    return None


def _special_from_config(d: Path, key: str) -> str | None:
    """eos_token / pad_token from an HF tokenizer_config.json or special_tokens_map.json (str or dict form)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = d / name
        if f.is_file():
            try:
                v = json.loads(f.read_text()).get(key)
            except ValueError:
                continue
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                return v
    return None


def load_tokenizer(path: str | Path) -> tuple[Tokenizer, int, int]:
    """Load a tokenizer.json file or an HF tokenizer directory -> (tokenizer, eos_id, pad_id)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"tokenizer path does not exist: {p}")
    cfg_dir = p if p.is_dir() else p.parent
    try:
        if p.is_file():
            tok = Tokenizer.from_file(str(p))
        elif (p / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(p / "tokenizer.json"))
        else:  # a slow-only HF dir (vocab.json + merges.txt, sentencepiece ...): let transformers convert it
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True, use_fast=True)
            if not getattr(hf, "is_fast", False):
                raise UserError(f"{p}: tokenizer has no fast (tokenizers) version")
            tok = hf.backend_tokenizer
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers/transformers raise plain Exception subclasses
        raise UserError(f"{p}: cannot load tokenizer ({type(e).__name__}: {e})") from None
    tok.no_truncation()
    tok.no_padding()
    eos_tok = EOS if tok.token_to_id(EOS) is not None else _special_from_config(cfg_dir, "eos_token")
    if eos_tok is None or tok.token_to_id(eos_tok) is None:
        for cand in ("</s>", "<eos>", "<|end_of_text|>", "<|im_end|>"):
            if tok.token_to_id(cand) is not None:
                eos_tok = cand
                break
        else:
            raise UserError(f"{p}: tokenizer has no EOS token ({EOS}, or eos_token in tokenizer_config.json)")
    eos_id = tok.token_to_id(eos_tok)
    pad_tok = PAD if tok.token_to_id(PAD) is not None else _special_from_config(cfg_dir, "pad_token")
    pad_id = tok.token_to_id(pad_tok) if pad_tok else None
    return tok, int(eos_id), int(eos_id if pad_id is None else pad_id)


def vocab_size(tok: Tokenizer) -> int:
    """Number of ids the tokenizer can emit (with added tokens): what the LM's embedding needs."""
    return int(tok.get_vocab_size(with_added_tokens=True))


def choose_dtype(n_vocab: int) -> np.dtype:
    """uint16 when every id fits in it (vocab <= 65535), else uint32: halves the memmap for small vocabs."""
    return np.dtype(np.uint16) if n_vocab <= 65535 else np.dtype(np.uint32)


PIECE_CHARS = 1 << 20  # a text longer than this is encoded in pieces of about this many characters


def iter_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """Cut a long text into pieces of at most `size` characters (about), each cut just before a single space that
    stands between two non-space characters: where a byte-level / whitespace pre-tokenizer cuts anyway (no
    pre-token spans a non-space and the space after it, and the space starts the next word), so the pieces' ids
    concatenated are the whole text's ids. A stretch of `size` characters without such a space (one giant
    "word") is cut where it reaches `size`: only that one cut may tokenize differently. Lazily: one piece at a
    time is copied out of the text."""
    a, n = 0, len(text)
    if n <= size:
        yield text
        return
    while n - a > size:
        b, lo = a + size, a + size // 2
        cut = -1
        i = text.rfind(" ", lo, b)
        while i > lo:
            if not text[i - 1].isspace() and not text[i + 1].isspace():
                cut = i
                break
            i = text.rfind(" ", lo, i)
        if cut <= a:
            cut = b
        yield text[a:cut]
        a = cut
    yield text[a:]


def split_long(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`iter_pieces` as a list."""
    return list(iter_pieces(text, size))


def _encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    fast = getattr(tok, "encode_batch_fast", None)
    return [e.ids for e in (fast or tok.encode_batch)(texts, add_special_tokens=False)]


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int] | np.ndarray]:
    """Token ids of each text, no special tokens (the caller appends EOS). encode_batch_fast skips offsets.
    A text longer than PIECE_CHARS is encoded piece by piece (`iter_pieces`) into one uint32 array, so a document
    of any length takes memory in proportion to its tokens (4 bytes each), not the tokenizer's per-token
    bookkeeping for the whole text at once."""
    if all(len(t) <= PIECE_CHARS for t in texts):
        return _encode(tok, texts)
    out: list[list[int] | np.ndarray] = []
    short: list[int] = []
    for i, t in enumerate(texts):
        if len(t) > PIECE_CHARS:
            parts = [np.asarray(_encode(tok, [piece])[0], dtype=np.uint32) for piece in iter_pieces(t, PIECE_CHARS)]
            out.append(np.concatenate(parts))
        else:
            out.append([])
            short.append(i)
    for i, ids in zip(short, _encode(tok, [texts[i] for i in short])):
        out[i] = ids
    return out


def _ids(tok: object, text: str, special: bool) -> list[int]:
    """Token ids of `text` for a `tokenizers.Tokenizer` or a transformers tokenizer, with or without the
    post-processor's special tokens."""
    enc = tok.encode(text, add_special_tokens=special)  # type: ignore[attr-defined]
    return list(enc.ids) if hasattr(enc, "ids") else list(enc)


def added_specials(tok: object) -> tuple[list[int], list[int]]:
    """(ids put before, ids put after) a text's own tokens when the tokenizer encodes with its special tokens
    (its post-processor, e.g. a BOS template). ([], []) for the trained BPE."""
    plain, full = _ids(tok, "a", False), _ids(tok, "a", True)
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k], full[k + len(plain):]
    return [], []


def special_prefix(tok: object) -> list[int]:
    """The ids a tokenizer puts before every text (its BOS, or nothing): what the model sees first."""
    return added_specials(tok)[0]


def bos_policy(tok: Tokenizer, path: str | Path | None = None) -> tuple[int | None, bool]:
    """(bos_id, add_bos) of a loaded tokenizer: the BOS named by an HF dir's tokenizer_config.json /
    special_tokens_map.json (else the single token its post-processor puts first), and whether each text gets it
    (`add_bos_token` of the config when set, else whether the post-processor adds it). UserError when the config
    asks for a BOS the vocabulary does not have."""
    cfg_dir = None if path is None else (Path(path) if Path(path).is_dir() else Path(path).parent)
    prefix = special_prefix(tok)
    name = _special_from_config(cfg_dir, "bos_token") if cfg_dir is not None else None
    bos_id = tok.token_to_id(name) if name else None
    if name and bos_id is None and _config_value(cfg_dir, "add_bos_token") is True:  # type: ignore[arg-type]
        raise UserError(f"{path}: add_bos_token is true but bos_token {name!r} is not in the vocabulary")
    if bos_id is None and len(prefix) == 1:
        bos_id = prefix[0]
    flag = _config_value(cfg_dir, "add_bos_token") if cfg_dir is not None else None
    add = flag if isinstance(flag, bool) else (bos_id is not None and prefix == [bos_id])
    if add and bos_id is None:
        raise UserError(f"{path}: add_bos_token is true but the tokenizer names no bos_token")
    return (None if bos_id is None else int(bos_id)), bool(add)


def set_bos_policy(tok: Tokenizer, bos_id: int | None, add_bos: bool) -> bool:
    """Make `tok` encode (with special tokens) as [BOS] + text when add_bos, else as the text alone, by replacing
    its post-processor when it does otherwise. Returns whether it was changed (the trained BPE never is)."""
    want = [int(bos_id)] if add_bos and bos_id is not None else []
    if add_bos and bos_id is None:
        raise UserError("the BOS policy says add_bos but names no bos_id")
    if added_specials(tok) == (want, []):
        return False
    if want:
        name = tok.id_to_token(want[0])
        if name is None:
            raise UserError(f"BOS id {want[0]} is not in the tokenizer's vocabulary")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{name}:0 $A:0", pair=f"{name}:0 $A:0 {name}:1 $B:1", special_tokens=[(name, want[0])])
    else:
        tok.post_processor = None
    return True


def load_prepared_tokenizer(path: str | Path, meta: dict) -> tuple[Tokenizer, bool]:
    """A prepared directory's tokenizer.json with meta.json's BOS policy applied (no fields: no BOS);
    returns (tokenizer, whether the policy changed it from the file)."""
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a malformed file
        raise UserError(f"cannot read tokenizer {path}: {e}") from None
    bos = meta.get("bos_id")
    return tok, set_bos_policy(tok, None if bos is None else int(bos), bool(meta.get("add_bos", False)))


def tokenizer_fingerprint(path: str | Path) -> str:
    """What decides which token an id means: a sha256 of a tokenizer.json's normalizer, pre-tokenizer, model
    (vocabulary, merges) and added tokens; the post-processor (the BOS template `set_bos_policy` may rewrite) and
    the decoder do not count. Two files with one fingerprint encode text to the same ids. UserError when the file
    cannot be read."""
    import hashlib

    obj = read_json_object(path, "tokenizer")
    keep = {k: obj.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def describe_tokenizer(path: str | Path) -> str:
    """A short name for messages: the file, its vocabulary size and the fingerprint's first 12 hex digits."""
    p = Path(path)
    try:
        n = vocab_size(Tokenizer.from_file(str(p)))
    except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception on a malformed file
        n = None
    return f"{p} ({'' if n is None else f'vocab {n}, '}sha {tokenizer_fingerprint(p)[:12]})"


def check_same_tokenizer(a: str | Path, b: str | Path, what: str) -> None:
    """UserError naming both tokenizers when a and b encode text to different ids (`what` says who needs them to
    agree, e.g. "dwm eval: the run's model and --data")."""
    if tokenizer_fingerprint(a) != tokenizer_fingerprint(b):
        raise UserError(f"{what} use different tokenizers: {describe_tokenizer(a)} vs {describe_tokenizer(b)}; "
                        "a model's ids mean nothing on data tokenized by another tokenizer")
