"""`quality`: QuRating-style selection by a per-document quality score (Wettig et al., 2024): keep the top-k, or
sample without replacement with probability proportional to exp(score / tau) by the Gumbel trick (tau = 2.0 by
default, QuRating's). Three sources of scores:

- `column`: a score column of the prepared data (`dwm prepare --score-fields ...`); a document's score is the
  token-weighted mean over its rows (NaN rows ignored; a document with none is never selected). QuRating's four
  criteria (writing_style, required_expertise, facts_and_trivia, educational_value) are recognised by name, also
  as QuRatedPajama's `<criterion>_average` columns;
- `hf`: a local Hugging Face sequence-classification checkpoint (e.g. a QuRater), batched, offline; the score is
  the logit of `--label` (0), on the first `--max-length` tokens of the document;
- `classifier`: a classifier dwm trains between a high-quality reference set (positives, `--target`) and random pool
  documents (negatives), the GPT-3 / DCLM recipe: hashed unigram+bigram features (scikit-learn's
  HashingVectorizer, 2^18 features, l2-normalised) and a logistic regression; the score is its log-odds.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dwm.data.dataset import read_split_table
from dwm.errors import UserError
from dwm.selection.method import SelectionMethod
from dwm.selection.pool import Pool, Shard, gumbel_keys, log, shard_texts

QURATING = ("writing_style", "required_expertise", "facts_and_trivia", "educational_value")
N_FEATURES = 1 << 18


@dataclass
class QualityOptions:
    source: Literal["column", "hf", "classifier"] = "classifier"
    column: str = ""
    model: str = ""
    label: int = 0
    max_length: int = 512
    batch_size: int = 16
    negatives: int = 0  # classifier: pool documents drawn as negatives (0: 4x the positives, at most 20,000)
    temperature: float = 2.0  # 0: deterministic top-k


def resolve_column(name: str, columns: list[str]) -> str:
    """A score column by name; a QuRating criterion also matches `<criterion>_average`."""
    if name in columns:
        return name
    if f"{name}_average" in columns:
        return f"{name}_average"
    from dwm.config import did_you_mean

    have = ", ".join(columns) if columns else "none"
    hint = did_you_mean(name, columns) or (f" (QuRating's criteria: {', '.join(QURATING)})"
                                          if name not in QURATING else "")
    raise UserError(f"--score-column {name!r}: the prepared data has no such score column (has: {have}){hint}")


def column_scores(pool: Pool, name: str) -> tuple[np.ndarray, str]:
    col = resolve_column(name, pool.score_columns)
    v = read_split_table(pool.dir, pool.split, [col])[col].to_numpy(zero_copy_only=False).astype(np.float64)
    w = np.where(np.isnan(v), 0.0, pool.row_tokens.astype(np.float64))
    starts = pool.unit_rows[:-1]
    num = np.add.reduceat(np.where(np.isnan(v), 0.0, v) * w, starts)
    den = np.add.reduceat(w, starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan), col


# ------------------------------------------------------------------------------------------ classifier
def _vectorizer():
    try:
        from sklearn.feature_extraction.text import HashingVectorizer
    except ImportError:
        raise UserError("the quality classifier needs scikit-learn: pip install 'dwm-llm[select]'") from None
    return HashingVectorizer(n_features=N_FEATURES, ngram_range=(1, 2), alternate_sign=False, norm="l2",
                             lowercase=True, dtype=np.float32)


def train_classifier(positives: list[str], negatives: list[str], seed: int) -> tuple[np.ndarray, float]:
    """(coef [N_FEATURES], intercept) of a logistic regression, positives = 1, classes balanced."""
    from sklearn.linear_model import LogisticRegression

    vec = _vectorizer()
    X = vec.transform(positives + negatives)
    y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000, solver="liblinear", random_state=seed)
    clf.fit(X, y)
    return clf.coef_.ravel().astype(np.float32), float(clf.intercept_[0])


def classifier_task(item: tuple[Shard, bytes]) -> np.ndarray:
    """Log-odds of every document of the shard."""
    shard, model = item
    coef, b = pickle.loads(model)
    X = _vectorizer().transform(shard_texts(shard))
    return np.asarray(X @ coef, dtype=np.float64) + b


def classifier_scores(pool: Pool, opts: QualityOptions, target: str | Path, engine: Any, seed: int
                      ) -> tuple[np.ndarray, dict[str, Any]]:
    from dwm.selection.dsir import read_target_texts

    _vectorizer()  # the one-line error before any work
    pos = read_target_texts(target)
    n_neg = opts.negatives or min(20000, 4 * len(pos))
    units = pool.sample_units(n_neg, seed)
    neg = pool.texts(units)
    t0 = time.perf_counter()
    coef, b = train_classifier(pos, neg, seed)
    fit_s = time.perf_counter() - t0
    model = pickle.dumps((coef, b))
    t0 = time.perf_counter()
    scores = np.concatenate(engine.map(classifier_task, [(s, model) for s in pool.shards(engine.workers)]))
    score_s = time.perf_counter() - t0
    log(f"quality classifier: {len(pos)} positives, {len(neg)} negatives, fit {fit_s:.1f}s; scored {len(pool):,} "
        f"documents in {score_s:.1f}s ({len(pool) / max(score_s, 1e-9):,.0f} docs/s)")
    return scores, {"positives": len(pos), "negatives": len(neg), "features": N_FEATURES, "ngram_range": [1, 2],
                    "target": str(target), "score_seconds": score_s, "docs_per_second": len(pool) / max(score_s, 1e-9)}


# ------------------------------------------------------------------------------------------ HF checkpoint
def hf_scores(pool: Pool, opts: QualityOptions, device: str) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = Path(opts.model)
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise UserError(f"--score-model {p}: not a local Hugging Face checkpoint directory (no config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(p, local_files_only=True).to(device).eval()
    except Exception as e:
        raise UserError(f"--score-model {p}: cannot load a sequence-classification model and tokenizer ({e})") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    model.config.pad_token_id = tok.pad_token_id
    n_labels = int(model.config.num_labels)
    if not 0 <= opts.label < n_labels:
        raise UserError(f"--label {opts.label}: the model has {n_labels} output(s)")
    out = []
    with torch.no_grad():
        for shard in pool.shards():
            texts = shard_texts(shard)
            for i in range(0, len(texts), opts.batch_size):
                enc = tok(texts[i:i + opts.batch_size], truncation=True, max_length=opts.max_length, padding=True,
                          return_tensors="pt").to(device)
                out.append(model(**enc).logits[:, opts.label].double().cpu().numpy())
    return np.concatenate(out)


def score(pool: Pool, opts: QualityOptions, target: str | Path, engine: Any, seed: int, device: str = "cpu"
          ) -> dict[str, Any]:
    settings: dict[str, Any] = {"source": opts.source, "temperature": opts.temperature}
    if opts.source == "column":
        if not opts.column:
            raise UserError("--method quality needs --score-column, --score-model or --classifier")
        scores, col = column_scores(pool, opts.column)
        settings["column"] = col
    elif opts.source == "hf":
        scores = hf_scores(pool, opts, device)
        settings.update(model=str(Path(opts.model).resolve()), label=opts.label, max_length=opts.max_length)
    else:
        scores, info = classifier_scores(pool, opts, target, engine, seed)
        settings.update(info)
    return {"scores": scores, "eligible": ~np.isnan(scores), "settings": settings}


def keys(result: dict[str, Any], opts: QualityOptions, seed: int) -> np.ndarray:
    return gumbel_keys(np.nan_to_num(result["scores"], nan=-np.inf), opts.temperature, seed)


class QualityMethod(SelectionMethod):
    """`--method quality`: exactly one of --score-column, --score-model, --classifier."""

    name = "quality"

    def run(self, pool: Pool, target: Path, engine: Any) -> tuple[dict[str, Any], np.ndarray]:
        a = self.args
        given = [n for n, v in (("column", a.score_column), ("hf", a.score_model), ("classifier", a.classifier)) if v]
        if len(given) != 1:
            raise UserError("--method quality needs exactly one of --score-column, --score-model, --classifier"
                            + (f" (got {len(given)})" if given else ""))
        t = 2.0 if a.temperature is None else a.temperature
        opts = QualityOptions(given[0], a.score_column or "", a.score_model or "", a.label, a.max_length,
                              a.batch_size, a.negatives, 0.0 if a.top_k else t)
        res = score(pool, opts, target, engine, a.seed, a.device)
        return res, keys(res, opts, a.seed)
