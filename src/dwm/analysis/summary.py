"""The numbers of `dwm analyze`: per stage of a run, over its probe set, the mean weight and LM loss per domain, the
Spearman correlations of the weights with each sample property (length, LM loss, diversity, score columns), the
domain's correlation ratio eta and one-vs-rest correlations, the weight distribution, the highest- and
lowest-weighted samples and what the hypergradient said per domain (`stage_summary`, `run_summary`); `json_safe`
makes them JSON (NaN and infinities as null). The measures themselves are in dwm/analysis/measures.py."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dwm.analysis.measures import (
    correlation_ratio,
    group_means,
    no_correlation,
    one_vs_rest,
    spearman,
    weight_summary,
)
from dwm.analysis.runs import RunData, Stage

ETA = "domain (eta)"


def vs_rest_name(d: str) -> str:
    return f"domain = {d} vs rest"


def properties(run: RunData, st: Stage) -> dict[str, np.ndarray | None]:
    """name -> the per-sample values the weights are correlated with (None: not available for this run)."""
    props: dict[str, np.ndarray | None] = {"length (tokens)": run.n_tokens, "LM loss": st.lm_loss,
                                           "diversity (bigram novelty)": run.novelty}
    for c, v in run.scores.items():
        props[f"score: {c}"] = v
    return props


def stage_summary(run: RunData, st: Stage, n_examples: int, chars: int) -> dict[str, Any]:
    ok = np.isfinite(st.weight)
    w, dom = st.weight[ok], run.domain[ok]
    ids = run.ids[ok]
    loss = st.lm_loss[ok] if st.lm_loss is not None else None
    corr, why = {}, {}
    for name, v in properties(run, st).items():
        corr[name] = None if v is None else spearman(w, v[ok])[0]
        if v is not None and math.isnan(corr[name]):
            why[name] = no_correlation(w, v[ok])
    eta, vs_rest = correlation_ratio(dom, w), one_vs_rest(dom, w)
    if math.isnan(eta):  # NaN only for constant weights or under 3 samples
        why[ETA] = no_correlation(w, np.arange(len(w)))
    for d, rho in vs_rest.items():
        if math.isnan(rho):
            why[vs_rest_name(d)] = no_correlation(w, (dom == d).astype(np.float64))
    order = np.argsort(-w, kind="stable")

    def example(i: int) -> dict[str, Any]:
        return {"sample_id": int(ids[i]), "domain": str(dom[i]), "weight": float(w[i]),
                "lm_loss": float(loss[i]) if loss is not None else None, "n_tokens": int(run.n_tokens[ok][i]),
                "text": run.text(int(ids[i]), chars)}

    n_ex = min(n_examples, len(w))
    mean_w = {d: float(w[dom == d].mean()) for d in run.domains if (dom == d).any()}
    signal = group_means(*st.signal) if st.signal is not None else None
    follows = None
    if signal is not None:
        ds = [d for d in signal if d in mean_w]
        follows = spearman([mean_w[d] for d in ds], [signal[d]["mean"] for d in ds])[0]
    return {
        "stage": st.k, "step": st.step, "total_steps": st.total_steps, "updates": st.updates, "skipped": st.skipped,
        "mean_weight_by_domain": mean_w,
        "mean_lm_loss_by_domain": ({d: float(np.nanmean(loss[dom == d])) for d in run.domains if (dom == d).any()}
                                   if loss is not None else None),
        "spearman": corr,
        "domain_eta": eta,
        "domain_vs_rest": vs_rest,
        "no_correlation": why,
        "weights": weight_summary(w),
        "signal_by_domain": signal,
        "weight_follows_signal": follows,
        "top": [example(i) for i in order[:n_ex]],
        "bottom": [example(i) for i in order[::-1][:n_ex]],
    }


def run_summary(run: RunData, n_examples: int, chars: int) -> dict[str, Any]:
    return {"label": run.label, "dir": str(run.dir), "mode": run.mode, "data_dir": str(run.data_dir),
            "split": run.split, "domains": run.domains, "probe_size": len(run.ids), "lm_loss": run.has_lm_loss,
            "score_columns": list(run.scores), "notes": list(run.notes),
            "stages": [stage_summary(run, st, n_examples, chars) for st in run.stages]}


def json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
