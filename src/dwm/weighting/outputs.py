"""What a DWM run writes for `dwm analyze` and replay (rank 0 only; layout and schemas: dwm.rundir):
weighting/stage_k.{safetensors,json}, probes/stage_k.parquet (phi's scores and weights of a fixed probe set, and
the LM's loss on it) and signal/stage_k.parquet (the samples stage k's updates probed: what phi learned from)."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from dwm import rundir
from dwm.nn import sharding as fsdp
from dwm.nn.losses import nll_no_grad
from dwm.weighting.net import save_weighting_net
from dwm.weighting.probe import Probed
from dwm.weighting.scorer import Scorer

PROBE_SEED = 20250713  # probes are a property of the data, not of the run: the same ids for every run


def probe_ids(domain_ids: np.ndarray, size: int, seed: int = PROBE_SEED) -> np.ndarray:
    """A fixed, domain-stratified sample of about `size` training rows: an equal share per domain (all rows of a
    smaller domain, the remainder spread over the others), sorted."""
    rng = np.random.default_rng(seed)
    doms = np.unique(domain_ids)
    by_dom = {d: np.flatnonzero(domain_ids == d) for d in doms}
    take, left, budget = {}, sorted(doms, key=lambda d: len(by_dom[d])), size
    while left:
        share = budget // len(left)
        d = left.pop(0)
        take[d] = min(share, len(by_dom[d]))
        budget -= take[d]
    return np.sort(np.concatenate([rng.choice(by_dom[d], take[d], replace=False) for d in doms]))


class StageWriter:
    """Writes a run's stage files. `ctx` needs: data (rows, domain_ids), model, autocast, run_dir, rank, log."""

    def __init__(self, scorer: Scorer, domains: list[str], probes: np.ndarray, *, probe_lm_loss: bool, micro: int):
        self.scorer, self.domains, self.probes = scorer, domains, probes
        self.probe_lm_loss, self.micro = probe_lm_loss, micro

    def _domains_of(self, ctx: Any, ids: np.ndarray) -> list[str]:
        return [self.domains[i] for i in ctx.data.domain_ids[ids]]

    def save_stage(self, ctx: Any, k: int, step: int, meta: dict[str, Any]) -> None:
        """weighting/stage_k.{safetensors,json} (the json's "dwm" object: `meta`, rundir.STAGE_META) and
        probes/stage_k.parquet (sample_id, domain, score, weight, stage, step, and with probe_lm_loss lm_loss, the
        LM's per-sample NLL at this step); every rank scores nothing else, so the probe pass costs only rank 0 (but
        for the LM's forwards under fsdp, which every rank runs: each gathers the shards of all)."""
        lm_loss = self._probe_lm_loss(ctx) if self.probe_lm_loss and fsdp.is_sharded(ctx.model) else None
        if ctx.rank != 0:
            return
        run = rundir.RunDir(ctx.run_dir)
        _, js = save_weighting_net(self.scorer.net, run.stage_stem(k))
        doc = json.loads(js.read_text())
        doc["dwm"] = meta
        js.write_text(json.dumps(doc, indent=2))
        t0 = time.perf_counter()
        scores = self.scorer.score_ids(ctx.data, self.probes, ctx.model)
        weight = self.scorer.weights(torch.from_numpy(scores).double()).numpy()
        n = len(self.probes)
        columns = {"sample_id": self.probes, "domain": self._domains_of(ctx, self.probes), "score": scores,
                   "weight": weight, "stage": np.full(n, k), "step": np.full(n, step)}
        if self.probe_lm_loss:  # for `dwm analyze`
            columns["lm_loss"] = self._probe_lm_loss(ctx) if lm_loss is None else lm_loss
        table = rundir.arrow_table(columns, rundir.PROBE_COLUMNS)
        run.probes.mkdir(parents=True, exist_ok=True)
        import pyarrow.parquet as pq

        pq.write_table(table, run.probe_file(k))
        w, dom = table["weight"].to_numpy(), np.asarray(table["domain"].to_pylist())
        ctx.log({"event": "stage", "stage": k, "probe_seconds": time.perf_counter() - t0,
                 "probe_weight_by_domain": {d: float(np.mean(w[dom == d])) for d in sorted(set(dom.tolist()))}})

    def _probe_lm_loss(self, ctx: Any) -> np.ndarray:
        """The LM's per-sample NLL on the probe set at this step (no grad, micro-batch chunks)."""
        p, m, dev = self.probes, self.micro, self.scorer.device
        out = nll_no_grad(ctx.model, (ctx.data.batch(p[i:i + m]).to(dev) for i in range(0, len(p), m)), ctx.autocast)
        return out.cpu().double().numpy() if len(p) else np.zeros(0)

    def save_signal(self, ctx: Any, buffer: list[Probed], k: int) -> None:
        """signal/stage_k.parquet (rank 0): every sample this stage's updates probed so far (the stage's part of
        phi's buffer), with its raw dL_ref(theta')/dw and its signal -dL/dw / (the update's spread): positive =
        weighting it up lowers the reference loss, on the scale phi fits. What the hypergradient said, next to what
        phi learned (probes/); `dwm analyze` compares the two per domain. Rewritten after every update from the
        state, so a resumed run writes the same file."""
        if ctx.rank != 0:
            return
        mine = [b for b in buffer if b.stage == k]
        sid = np.concatenate([b.ids for b in mine])
        table = rundir.arrow_table({
            "sample_id": sid, "domain": self._domains_of(ctx, sid),
            "dL_dw": np.concatenate([b.dL_dw for b in mine]), "signal": np.concatenate([-b.target for b in mine]),
            "stage": np.full(len(sid), k), "step": np.concatenate([np.full(len(b.ids), b.step) for b in mine]),
        }, rundir.SIGNAL_COLUMNS)
        rundir.write_parquet_atomic(table, rundir.RunDir(ctx.run_dir).signal_file(k))
