"""`influence`: MATES-style model-aware online selection (Yu et al., 2024), a selector of `dwm train`
(selector.mode = "influence", options under [influence]).

Every `selector.every` steps the trainer's online-selection hook (dwm/train/selector.py: OnlineSelector) hands over
the next candidates x (every x G) samples of the data stream; this selector scores them and the next `every` steps
train on the best every x G only (Gumbel top-k on the standardised scores, temperature influence.temperature). A
dropped candidate is never forwarded by the LM.

Score = the sample's first-order influence on the reference loss at the current model, -dL_ref(theta')/dw_i: how
much giving it weight in the next (AdamW) step lowers the loss on the LAMBADA-format reference passages. MATES probes
this by one-step training per sample and fits a small model to predict it for the whole pool; here the probe is the
bi-level hypergradient dwm already computes (dwm.nn.bilevel.hypergradient with every weight 0: the lookahead
is AdamW's momentum step alone, and each probed sample costs two no-grad forwards of the LM). `influence.probe` of
the candidates (25%) are probed; the influence model, a ridge regression on hashed token unigram + bigram features
and the domain (no LM compute), is fitted on the last `influence.history` probe rounds (standardised per round, so
rounds at different learning rates and losses compare) and predicts the rest. probe = 1 probes every candidate.

Cost per selection, against uniform training of the same steps: 2 x probe x candidates no-grad forwards per kept
sample plus one reference backward; with the defaults (candidates 2, probe 0.25) one forward per kept sample,
about a third of a training step. `select` events in metrics.jsonl record the seconds spent and the probe's fit.
Single process only (the probe runs on rank 0 alone).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from dwm.data.passages import PassageSet
from dwm.errors import UserError
from dwm.nn.bilevel import hypergradient
from dwm.nn.lookahead import adam_lookahead
from dwm.nn.sampling import gumbel_top_k
from dwm.selection.config import InfluenceConfig
from dwm.selection.dsir import mix64, ngram_buckets
from dwm.selection.method import SelectionMethod
from dwm.train.context import TrainContext
from dwm.train.selector import OnlineSelector, SelectorConfig


def token_features(rows: np.ndarray, n_tokens: np.ndarray, domains: np.ndarray, n_domains: int, buckets: int
                   ) -> np.ndarray:
    """[n, buckets + n_domains] float64: hashed token unigram + bigram frequencies of each row (l2-normalised),
    then a one-hot of the domain."""
    n = len(rows)
    real = np.arange(rows.shape[1])[None, :] < n_tokens[:, None]
    doc = np.repeat(np.arange(n), n_tokens)
    h = mix64(rows[real].astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    b, d = ngram_buckets(h, doc, 2, buckets)
    X = np.zeros((n, buckets + n_domains))
    np.add.at(X, (d, b), 1.0)
    X[:, :buckets] /= np.maximum(np.linalg.norm(X[:, :buckets], axis=1, keepdims=True), 1e-12)
    X[np.arange(n), buckets + domains] = 1.0
    return X


def ridge_predict(X: np.ndarray, y: np.ndarray, X_new: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge regression with an intercept, solved in its dual form (n samples < d features)."""
    mx, my = X.mean(0), y.mean()
    Xc = X - mx
    a = np.linalg.solve(Xc @ Xc.T + alpha * np.eye(len(X)), y - my)
    return (X_new - mx) @ (Xc.T @ a) + my


def _standardise(x: np.ndarray) -> np.ndarray:
    s = x.std()
    return (x - x.mean()) / s if s > 0 else np.zeros_like(x)


class InfluenceSelector(OnlineSelector):
    """See the module docstring."""

    name = "influence"
    config_section = "influence"  # dwm.run passes the run config's [influence] section

    def __init__(self, cfg: SelectorConfig | None = None, icfg: InfluenceConfig | None = None):
        super().__init__(cfg)
        self.icfg = icfg or InfluenceConfig()

    def attach(self, ctx: TrainContext) -> None:
        super().attach(ctx)
        if ctx.world_size > 1:
            raise UserError("selector.mode = influence runs on one process (its probe is not distributed yet)")
        self.icfg.check_paths()
        self.ref = PassageSet(self.icfg.reference, ctx.tokenizer, max_len=ctx.plan.seq_len, mode="passage",
                              pad_id=ctx.data.pad_id)
        self.history: list[tuple[np.ndarray, np.ndarray]] = []  # (sample ids, standardised influence) per round
        self.totals = {"selections": 0, "probed": 0, "candidates": 0, "seconds": 0.0}

    def _features(self, ctx: TrainContext, ids: np.ndarray) -> np.ndarray:
        data = ctx.data
        return token_features(np.asarray(data.tokens[ids]), data.n_tokens[ids], data.domain_ids[ids],
                              len(data.domains), self.icfg.buckets)

    def probe(self, ctx: TrainContext, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """-dL_ref(theta')/dw_i for each sample (higher: training on it lowers the reference loss more)."""
        batch = ctx.data.batch(ids).to(ctx.device)
        ref_ids, ref_mask = self.ref.batch(rng, size=self.icfg.ref_batch)
        lr = max(ctx.lr, ctx.optim.lr * ctx.optim.min_lr_ratio, 1e-12)
        res = hypergradient(ctx.model, batch.input_ids, batch.n_tokens, torch.zeros(len(ids), device=ctx.device),
                            ref_ids.to(ctx.device), ref_mask.to(ctx.device), lr=lr,
                            precond=adam_lookahead(ctx.optimizer, ctx.model),
                            global_batch_size=ctx.plan.global_batch_size, measure_before=False,
                            chunk_size=self.icfg.chunk or ctx.plan.micro_batch_size)
        if not res.ok:
            ctx.log({"event": "influence_probe_failed", "reason": res.reason})
            return np.zeros(len(ids))
        return -res.dL_dw.double().cpu().numpy()

    def score(self, ctx: TrainContext, ids: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        chunk = ctx.step // self.cfg.every
        rng = np.random.default_rng([ctx.seed, 0x1F, chunk])
        n = len(ids)
        k = max(2, min(n, round(self.icfg.probe * n)))
        probed = np.sort(rng.choice(n, size=k, replace=False))
        z = _standardise(self.probe(ctx, ids[probed], rng))
        self.history = (self.history + [(ids[probed].copy(), z)])[-self.icfg.history:]
        scores = np.zeros(n)
        fit = float("nan")
        if k < n:
            hist_ids = np.concatenate([h[0] for h in self.history])
            hist_z = np.concatenate([h[1] for h in self.history])
            Xh = self._features(ctx, hist_ids)
            scores = ridge_predict(Xh, hist_z, self._features(ctx, ids), self.icfg.ridge)
            # how well the model (fitted before this round) would rank this round's probes
            if len(self.history) > 1:
                m = len(hist_ids) - k
                pred = ridge_predict(Xh[:m], hist_z[:m], Xh[m:], self.icfg.ridge)
                fit = float(np.corrcoef(pred, z)[0, 1]) if pred.std() > 0 else float("nan")
        scores[probed] = z
        dt = time.perf_counter() - t0
        t = self.totals
        t["selections"] += 1
        t["probed"] += k
        t["candidates"] += n
        t["seconds"] += dt
        ctx.log({"event": "influence", "chunk": chunk, "candidates": n, "probed": k, "seconds": round(dt, 4),
                 "model_corr": fit})
        return scores

    def keep(self, ctx: TrainContext, ids: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
        """Gumbel top-k: n candidates without replacement, probability proportional to exp(score / T)."""
        rng = np.random.default_rng([ctx.seed, 0x6B, ctx.step // self.cfg.every])
        return ids[gumbel_top_k(scores, n, rng, self.icfg.temperature)]

    def step_metrics(self) -> dict[str, float]:
        return {**super().step_metrics(), "select_seconds_total": self.totals["seconds"]}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": [(a.copy(), b.copy()) for a, b in self.history],
                "totals": dict(self.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state:
            self.history = [(np.asarray(a), np.asarray(b)) for a, b in state.get("history", [])]
            self.totals.update(state.get("totals", {}))


class InfluenceMethod(SelectionMethod):
    """`--method influence` is online: it names the selector of `dwm train` instead."""

    name = "influence"

    def __init__(self, args: Any):
        raise UserError("influence selects online, during training: run `dwm train ... selector.mode=influence` "
                        "(options under [influence], see `dwm train --help-config`)")
