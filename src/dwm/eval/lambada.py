"""LAMBADA accuracy and perplexity with lm-evaluation-harness's exact `lambada_openai` semantics.

Why re-implement instead of always calling lm-eval: `dwm eval` must work on a bare run directory (no export, no
`datasets`, no task registry) and fast enough to run after every training job. To be comparable with published
numbers the semantics are lm-eval's, token for token (tests/test_harness.py checks equality):

* context = every space-separated word but the last, target = " " + last word (`doc_to_text`/`doc_to_target`);
* `_encode_pair`: trailing spaces of the context move to the continuation; whole = enc(context + continuation),
  context_enc = enc(context), continuation_enc = whole[len(context_enc):]; the tokenizer adds a BOS only if it
  is configured to; an empty context becomes the prefix token (BOS, else EOS);
* input = (context_enc + continuation_enc)[-(max_length + 1):][:-1] (left truncation), right-padded batches;
* a hit when the greedy token equals the target token at every continuation position;
* perplexity = exp(-mean over passages of the summed target log-probability); acc_stderr = sample std / sqrt(n).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dwm.data.passages import PassageSet, load_passages, passage_nll, split_context_target
from dwm.errors import UserError

Encoder = Callable[[str], list[int]]


def make_encoder(tokenizer: Any) -> Encoder:
    """str -> token ids for a transformers tokenizer or a `tokenizers.Tokenizer`, special tokens as configured
    (the same call lm-eval's HFLM.tok_encode makes)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return lambda s: list(tokenizer.encode(s).ids)
    return lambda s: list(tokenizer.encode(s))


def prefix_token_id(tokenizer: Any) -> int:
    """The token that stands in for an empty context: BOS if the tokenizer has one, else EOS (lm-eval's rule)."""
    for attr in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    for name in ("<|endoftext|>", "</s>", "<eos>", "<s>"):  # a raw tokenizers.Tokenizer has no named roles
        tid = tokenizer.token_to_id(name) if hasattr(tokenizer, "token_to_id") else None
        if tid is not None:
            return int(tid)
    raise UserError("tokenizer has neither a BOS nor an EOS token to use as the prefix of an empty context")


def encode_pair(encode: Encoder, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    """lm-eval's `loglikelihood` + `_encode_pair` for a causal model."""
    if context == "":
        cont = encode(continuation)
        return ([prefix_id], cont) if cont[0] != prefix_id else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    context_enc = encode(context)
    return context_enc, whole[len(context_enc):]


def model_max_length(model: torch.nn.Module, default: int = 2048) -> int:
    """The context length lm-eval's HFLM assumes for an HF model (config n_positions / max_position_embeddings)."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if v is not None:
            return int(v)
    return default


@torch.no_grad()
def score_pairs(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                max_length: int | None = None) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, greedy exact match) per (context_enc, continuation_enc) pair.

    Longest first (as lm-eval) so padding per batch is small; results are returned in input order.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    max_len = max_length or model_max_length(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            inps, conts = [], []
            for i in idx:
                ctx, cont = pairs[i]
                if not ctx or not cont:
                    raise UserError("a LAMBADA pair has an empty context or target after tokenization")
                if len(cont) > max_len:
                    raise UserError(f"target of {len(cont)} tokens exceeds the model's max length {max_len}")
                inps.append((ctx + cont)[-(max_len + 1):][:-1])
                conts.append(cont)
            width = max(len(x) for x in inps)
            batch = torch.zeros(len(inps), width, dtype=torch.long)
            for r, x in enumerate(inps):
                batch[r, :len(x)] = torch.tensor(x, dtype=torch.long)
            logits = model(batch.to(device)).logits
            for r, (x, cont) in enumerate(zip(inps, conts)):
                lp = F.log_softmax(logits[r, len(x) - len(cont):len(x)].float(), dim=-1)
                tgt = torch.tensor(cont, dtype=torch.long, device=lp.device)
                greedy = bool((lp.argmax(-1) == tgt).all())
                out[idx[r]] = (float(lp.gather(1, tgt[:, None]).sum()), greedy)
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def aggregate(results: Sequence[tuple[float, bool]]) -> dict[str, float | int]:
    """lm-eval's aggregation: acc = mean hit, acc_stderr = sample std / sqrt(n), perplexity = exp(-mean ll)."""
    n = len(results)
    if n == 0:
        raise UserError("no LAMBADA passages to evaluate")
    lls = [ll for ll, _ in results]
    hits = [float(h) for _, h in results]
    acc = sum(hits) / n
    stderr = math.sqrt(sum((h - acc) ** 2 for h in hits) / (n - 1)) / math.sqrt(n) if n > 1 else float("nan")
    mean_ll = sum(lls) / n
    ppl = math.exp(-mean_ll) if -mean_ll < 700 else float("inf")
    return {"acc": acc, "acc_stderr": stderr, "perplexity": ppl, "n": n}


def lambada_eval(model: torch.nn.Module, tokenizer: Any, path_or_passages: str | Path | Iterable[str | dict],
                 batch_size: int = 16, max_passages: int | None = None,
                 max_length: int | None = None) -> dict[str, float | int]:
    """LAMBADA accuracy/perplexity of `model` on a JSONL path or a list of passages (str or {"text": str}).

    Returns {"acc", "acc_stderr", "perplexity", "n"}; equal to lm-eval's lambada_openai on the same model/file.
    """
    if isinstance(path_or_passages, (str, Path)):
        passages = load_passages(path_or_passages)
    else:
        passages = [p["text"] if isinstance(p, dict) else p for p in path_or_passages]
    if max_passages is not None:
        passages = passages[:max_passages]
    encode = make_encoder(tokenizer)
    prefix = prefix_token_id(tokenizer)
    pairs = [encode_pair(encode, *split_context_target(t), prefix) for t in passages]
    return aggregate(score_pairs(model, pairs, batch_size=batch_size, max_length=max_length))


def passage_loss(model: torch.nn.Module, tokenizer: Any, path: str | Path, batch_size: int = 16,
                 max_passages: int | None = None) -> float:
    """Mean over passages of the mean next-token NLL of every passage token: the weighting model's outer objective
    (`weighting.advanced.ref_loss = "passage"`) measured on another split. A smoother LAMBADA-style loss than the target
    word's perplexity, which for small models is dominated by a few unguessable words."""
    ref = PassageSet(path, tokenizer, max_len=model_max_length(model), mode="passage")
    idx = list(range(len(ref)))[:max_passages]
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(idx), batch_size):
            ids, mask = ref.batch(idx[i:i + batch_size])
            ids, mask = ids.to(device), mask.to(device)
            total += float(passage_nll(model(input_ids=ids).logits, ids, mask)) * ids.shape[0]
    return total / len(idx)
