"""DWMWeighter: the Data Weighting Model inside the ctx.

    scores s = f_phi(batch)  ->  w = B * softmax(s / tau) over the *global* batch  ->  LM minimises (1/B) sum w_i l_i

The weighting model phi is trained by bi-level updates (`dwm.weighting.bilevel.hypergradient` gives dL_ref/dw;
autograd chains it into phi through the scores). When phi is updated is the schedule:

- staged (default, the paper's): training is split into K stages of T/K LM steps. At the first step of stage k,
  phi takes M bi-level updates against the current LM, is saved as `weighting/stage_k`, scores the probe set, and
  is frozen for the rest of the stage.
- interleaved: one bi-level update every `interval` LM steps; stage boundaries still save a snapshot and probes.
- replay (`weighting.mode = RUN_DIR`, transfer): the source run's stage models are loaded in turn, stage k at the
  same *fraction* of training as in the source run, with no bi-level updates, on any data selection and any LM
  size (same tokenizer). With `keep_learning`, each replayed stage model is the starting point of M updates.

Bi-level batches are drawn from the training data (or its selection) by the weighter's own seeded generator, so
the LM's data order and RNG streams are the same with and without DWM, and the weighter's generator is part of the
checkpoint: a killed DWM run resumes exactly. Under DDP each rank scores its share; scores are all-gathered so the
softmax runs over the global batch, and phi's gradients are all-reduced, so a 2-process run equals a 1-process one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from dwm.data.batch import Batch
from dwm.data.passages import PassageSet
from dwm.errors import UserError
from dwm.train import fsdp
from dwm.train.context import TrainContext
from dwm.train.losses import per_sample_nll
from dwm.train.selector import OnlineSelector, SelectorConfig
from dwm.train.weighter import Weighter
from dwm.weighting.bilevel import adam_lookahead, all_reduce_, hypergradient
from dwm.weighting.config import WeightingConfig
from dwm.weighting.net import WeightingNet, load_weighting_net, save_weighting_net, weights_from_scores

log = logging.getLogger(__name__)
PROBE_SEED = 20250713  # probes are a property of the data, not of the run: the same ids for every run


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weight_stats(w: torch.Tensor, domain_ids: torch.Tensor, domains: list[str]) -> dict[str, float]:
    """Entropy of w/B (normalised by log B: 1 = uniform), effective sample size (sum w)^2 / sum w^2, min, max and
    the mean weight of each domain present in the batch."""
    w = w.detach().double().cpu()
    B = w.numel()
    p = w / w.sum()
    ent = float(-(p * torch.log(p.clamp_min(1e-300))).sum())
    out = {"w_entropy": ent / math.log(B) if B > 1 else 1.0, "w_ess": float(w.sum() ** 2 / (w * w).sum()),
           "w_min": float(w.min()), "w_max": float(w.max())}
    d = domain_ids.detach().cpu()
    for i in torch.unique(d).tolist():
        out[f"w_domain/{domains[i]}"] = float(w[d == i].mean())
        out[f"share/{domains[i]}"] = float(w[d == i].sum() / w.sum())  # how much of the step the domain is
    return out


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their average rank (so constant scores have no correlation with anything)."""
    _, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(cnt) - (cnt + 1) / 2)[inv]


def phi_objective(W: torch.Tensor, target: torch.Tensor, kl: float) -> torch.Tensor:
    """phi's outer objective on one group of n samples with weights W (sum n): sum_i W_i t_i / n, the first-order
    change of L_ref if the LM stepped on the group with weights W (t = dL/dw, normalised), plus kl * KL(W/n ||
    uniform). Without the KL term the objective is linear in W and its optimum puts all weight on one sample; with
    it the optimum is W ~ exp(-t / kl)."""
    n = W.numel()
    loss = (W * target.to(W.dtype).to(W.device)).sum() / n
    if kl > 0:
        p = W / n
        loss = loss + kl * (p * torch.log(p.clamp_min(1e-30) * n)).sum()
    return loss


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


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


class StageSource:
    """The stage models of a finished DWM run, for replay (transfer)."""

    def __init__(self, run_dir: str | Path, tokenizer_sha: str):
        self.dir = Path(run_dir) / "weighting"
        stems = sorted(self.dir.glob("stage_*.json"), key=lambda p: int(p.stem.split("_")[1]))
        if not stems:
            raise UserError(f"--weighting {run_dir}: no weighting/stage_*.json there (not a DWM run, or it has "
                            f"not reached its first stage)")
        self.meta = [json.loads(p.read_text()) for p in stems]
        self.stems = [p.with_suffix("") for p in stems]
        self.n_stages = int(self.meta[0].get("dwm", {}).get("stages", len(stems)))
        src_sha = self.meta[0].get("dwm", {}).get("tokenizer_sha256")
        if src_sha and src_sha != tokenizer_sha:
            raise UserError(f"--weighting {run_dir}: its weighting model reads another tokenizer's ids; "
                            f"transfer needs the same tokenizer (prepare the new data with its tokenizer.json)")

    def stem_for(self, stage: int) -> Path:
        """Stage `stage` of the source, or its last saved stage if the source stopped earlier."""
        known = {int(m["dwm"]["stage"]): s for m, s in zip(self.meta, self.stems)}
        return known[max(k for k in known if k <= stage)] if any(k <= stage for k in known) else self.stems[0]

    def domains(self) -> list[str]:
        return list(self.meta[0].get("dwm", {}).get("domains", []))


class DWMSelector(OnlineSelector):
    """weighting.apply = "resample": every step's batch is G samples drawn from the next `candidates` x G of the
    data stream with probability softmax(s / tau) (mixed with the uniform floor), without replacement (Gumbel
    top-k), by the DWM's current scores. Weighting a uniform batch by w and drawing the batch in proportion to w
    have the same expected gradient; drawing keeps every sample of the step at weight 1 (no loss of effective
    batch size, which at small batches costs more than the weighting gains), and a candidate left out costs
    only the weighting model's forward. Its own seeded generator is part of the checkpoint."""

    name = "dwm"
    log_selections = False  # one per step: the weighter logs the batch's domain shares instead

    def __init__(self, weighter: DWMWeighter):
        super().__init__(SelectorConfig(mode="dwm", every=1, candidates=weighter.cfg.candidates))
        self.weighter = weighter

    def attach(self, ctx: TrainContext) -> None:
        super().attach(ctx)
        self.rng = np.random.default_rng([ctx.seed, 0x5E1])

    def score(self, ctx: TrainContext, ids: np.ndarray) -> np.ndarray:
        return self.weighter.score_samples(ctx, ids).astype(np.float64)

    def keep(self, ctx: TrainContext, ids: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
        w = self.weighter
        p = weights_from_scores(torch.from_numpy(scores), w.temperature, w.floor).numpy() / len(scores)
        keys = np.log(np.clip(p, 1e-300, None)) + self.rng.gumbel(size=len(ids))
        return ids[np.sort(np.argsort(-keys, kind="stable")[:n])]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state:
            self.rng.bit_generator.state = state["rng"]


class Probed(NamedTuple):
    """The samples one bi-level update probed: phi's evidence and what signal/stage_k.parquet holds."""
    ids: np.ndarray
    dL_dw: np.ndarray  # raw dL_ref(theta')/dw, float64
    spread: float  # the update's normalisation (std of dL/dw across its samples with normalize="std", else 1)
    step: int
    stage: int

    @property
    def target(self) -> np.ndarray:
        """What phi fits: dL/dw on the update's own scale."""
        return self.dL_dw / self.spread


class DWMWeighter(Weighter):
    name = "dwm"

    def __init__(self, cfg: WeightingConfig):
        super().__init__(cfg)
        self.cfg: WeightingConfig = cfg
        self.needs_losses = cfg.net.use_loss_feature  # the trainer hands weights() the training forward's losses
        self.replay = cfg.mode not in ("dwm", "uniform")
        self.learn = not self.replay or cfg.keep_learning
        self.stage = -1
        self.n_updates = 0
        self.n_skipped = 0
        self.n_ess_warnings = 0
        self._metrics: dict[str, float] = {}
        self._update_log: dict[str, float] = {}

    # ------------------------------------------------------------ setup

    def attach(self, ctx: TrainContext) -> None:
        cfg = self.cfg
        self.device = ctx.device
        self.rank, self.world = ctx.rank, ctx.world_size
        self.total_steps = max(1, ctx.total_steps)
        self.domains = list(ctx.data.domains)
        self.tokenizer_sha = file_sha256(ctx.data.tokenizer_path)
        self.source = StageSource(cfg.mode, self.tokenizer_sha) if self.replay else None
        self.n_stages = self.source.n_stages if self.source else cfg.stages
        # a replayed schedule is replayed as it was learned: the source's temperature and floor, not this config's
        src = self.source.meta[0].get("dwm", {}) if self.source else {}
        self.temperature = float(src.get("temperature", cfg.temperature))
        self.floor = float(src.get("floor", cfg.floor))
        if self.n_stages < 1:
            raise UserError(f"weighting.stages must be >= 1, got {self.n_stages}")
        if self.source is not None:
            self.net = self._load_stage_net(0)
        else:
            emb = (fsdp.full_tensor(ctx.model.get_input_embeddings().weight.detach())  # fsdp: gathered
                   if cfg.net.init_from_lm_embedding else None)
            with torch.random.fork_rng(devices=[]):  # phi's init must not shift the LM's RNG streams
                torch.manual_seed(ctx.seed + 1)
                self.net = WeightingNet(cfg.net, ctx.plan.vocab_size, len(self.domains), lm_embedding=emb)
        self.net.to(self.device, dtype=next(ctx.model.parameters()).dtype)  # fp64 runs: checks
        self.needs_losses = self.net.cfg.use_loss_feature  # a replayed net decides for itself
        steps_per_stage = self.total_steps / self.n_stages
        self.updates_per_stage = (cfg.updates_per_stage if cfg.updates_per_stage > 0
                                  else max(1, round(cfg.update_fraction * steps_per_stage)))
        self.micro = ctx.plan.micro_batch_size
        self.G = ctx.plan.global_batch_size
        self.pool = ctx.pool
        self.buffer: list[Probed] = []  # phi's evidence: the last `buffer_stages` stages' probed samples
        self.diag_ids: np.ndarray | None = None
        self._diag_signal: tuple[np.ndarray, np.ndarray] | None = None
        self.update_pool = self.pool
        if self.learn and cfg.diagnostics:  # held back: never drawn for phi's updates
            drng = np.random.default_rng([ctx.seed, 0xD1A6])
            n_diag = min(cfg.diagnostics_size, len(self.pool) // 2)
            self.diag_ids = np.sort(drng.choice(self.pool, n_diag - n_diag % self.world, replace=False))
            self.update_pool = np.setdiff1d(self.pool, self.diag_ids)
        self.rng = np.random.default_rng([ctx.seed, 0xD3])
        self.optimizer = None
        self.reference = None
        if self.learn:
            self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            self.reference = PassageSet(cfg.reference, ctx.tokenizer, max_len=ctx.plan.seq_len,
                                        mode=cfg.ref_loss, pad_id=ctx.data.pad_id)
            if fsdp.compute_dtype(ctx.model) in fsdp.LOW_PRECISION:  # fails at attach, not at the first update
                raise UserError("the bi-level update's finite differences need float32 compute, but fsdp computes in "
                                "bf16 here: set train.precision=fp32 (or train.parallel=ddp: fp32 weights under "
                                "bf16 autocast)")
            if cfg.ref_batch_size % self.world:
                raise UserError(f"weighting.ref_batch_size {cfg.ref_batch_size} must be divisible by the "
                                f"number of processes {self.world}")
        self.probes = probe_ids(ctx.data.domain_ids, min(cfg.probe_size, len(ctx.data)))
        if self.world > 1 and cfg.net.batch_context:
            raise UserError("weighting.net.batch_context attends across the batch and is single-process only; "
                            "under DDP each rank would see a different context")
        ctx.log({"event": "dwm_attach", "mode": "replay" if self.replay else "learn", "learn": self.learn,
                 "stages": self.n_stages, "updates_per_stage": self.updates_per_stage,
                 "weighting_params": sum(p.numel() for p in self.net.parameters()),
                 "reference_passages": len(self.reference) if self.reference else 0})

    def _load_stage_net(self, stage: int) -> WeightingNet:
        assert self.source is not None
        net = load_weighting_net(self.source.stem_for(stage), map_location="cpu")
        if net.cfg.use_domain_feature and self.source.domains() != self.domains:
            raise UserError(f"--weighting: the source weighting model uses domain ids of {self.source.domains()}, "
                            f"this data has {self.domains}; replay needs the same domain list")
        return net

    # ------------------------------------------------------------ schedule

    def stage_of(self, step: int) -> int:
        return min(self.n_stages - 1, step * self.n_stages // self.total_steps)

    def before_step(self, ctx: TrainContext, step: int) -> None:
        k = self.stage_of(step)
        if k != self.stage:
            self._enter_stage(ctx, k, step)
        elif self.learn and self.cfg.schedule == "interleaved" and step % self.cfg.interval == 0 and self._learns(k):
            self._update(ctx)

    def _learns(self, k: int) -> bool:
        """Whether stage k takes bi-level updates (not one of the uniform first or frozen last stages)."""
        return self.cfg.uniform_stages <= k < self.n_stages - self.cfg.frozen_stages

    def _enter_stage(self, ctx: TrainContext, k: int, step: int) -> None:
        if self.source is not None and self.source.n_stages > 1 and k > 0:
            self.net.load_state_dict(self._load_stage_net(k).state_dict())
            if self.optimizer is not None:  # a fresh start from the replayed model: drop stale moments
                self.optimizer.state.clear()
        if self.learn and self._learns(k):
            # phi learns from the hypergradients of the last `buffer_stages` stages' LMs (the signal moves)
            self.buffer = [b for b in self.buffer if b.stage > k - self.cfg.buffer_stages]
            if self.cfg.schedule == "staged":
                n = self.updates_per_stage
            else:  # interleaved: the boundary step is an ordinary step of the every-`interval` rhythm
                n = 1 if step % self.cfg.interval == 0 else 0
            self._diagnose(ctx, "before")
            for _ in range(n):
                self._update(ctx)
            self._diagnose(ctx, "after")
        self.stage = k
        self._save_stage(ctx, k, step)

    # ------------------------------------------------------------ weights

    def _gather(self, local: torch.Tensor, keep_grad: bool = False) -> torch.Tensor:
        """Concatenate every rank's tensor (rank order); with keep_grad the local part stays in the graph."""
        if self.world == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.detach().contiguous())
        if keep_grad:
            parts[self.rank] = local
        return torch.cat(parts)

    def _lm_losses(self, ctx: TrainContext, batch: Batch) -> torch.Tensor | None:
        if not self.cfg.net.use_loss_feature:
            return None
        out = []
        with torch.no_grad():
            for i in range(0, len(batch), self.micro):
                mb = batch.slice(i, i + self.micro)
                out.append(per_sample_nll(ctx.model(input_ids=mb.input_ids).logits, mb.input_ids, mb.n_tokens))
        return torch.cat(out)

    def _scores(self, batch: Batch, lm_loss: torch.Tensor | None) -> torch.Tensor:
        return self.net(batch.input_ids, batch.n_tokens, batch.domain_ids, lm_loss)

    def _chunked(self) -> bool:
        """Whether phi may score a batch in chunks: not when a sample's score depends on the rest of the batch
        (batch_context) or on a dropout draw (a second pass would draw another mask)."""
        return not (self.net.cfg.batch_context or self.net.cfg.dropout > 0)

    def _scores_no_grad(self, batch: Batch, lm_loss: torch.Tensor | None) -> torch.Tensor:
        """phi's scores of a batch without a graph, a micro-batch of samples per forward (phi's memory per sample
        is far below the LM's, so this keeps it under a training micro-batch's)."""
        n = len(batch)
        step = self.micro if self._chunked() else max(1, n)
        with torch.no_grad():
            return torch.cat([self._scores(batch.slice(a, a + step), None if lm_loss is None else lm_loss[a:a + step])
                              for a in range(0, n, step)]) if n else torch.zeros(0, device=self.device)

    def make_selector(self) -> OnlineSelector | None:
        return DWMSelector(self) if self.cfg.apply == "resample" else None

    def weights(self, batch: Batch, losses: torch.Tensor | None = None) -> torch.Tensor:
        batch = batch.to(self.device)
        if self.cfg.apply == "resample":  # the batch was drawn by the scores (DWMSelector): it counts uniformly
            W = torch.ones(len(batch) * self.world, device=self.device)
            stats = weight_stats(W, self._gather(batch.domain_ids), self.domains)
            self._metrics = {**{k: v for k, v in stats.items() if k.startswith("share/")},
                             "dwm_stage": float(self.stage), "dwm_updates": float(self.n_updates),
                             "dwm_skipped": float(self.n_skipped), **self._update_log}
            self._update_log = {}
            return torch.ones(len(batch), device=self.device)
        self.net.eval()
        with torch.no_grad():
            s = self._scores_no_grad(batch, losses)
            S = self._gather(s.float())
            W = weights_from_scores(S, self.temperature, self.floor)
            stats = weight_stats(W, self._gather(batch.domain_ids), self.domains)
        B = W.numel()
        if stats["w_ess"] < self.cfg.min_ess_fraction * B:
            self.n_ess_warnings += 1
            if self.n_ess_warnings == 1 or self.n_ess_warnings % 100 == 0:
                log.warning("DWM: effective sample size %.1f of a batch of %d (below %.0f%%; warning %d)",
                            stats["w_ess"], B, 100 * self.cfg.min_ess_fraction, self.n_ess_warnings)
        self._metrics = {**stats, "dwm_stage": float(self.stage), "dwm_updates": float(self.n_updates),
                         "dwm_skipped": float(self.n_skipped), "dwm_ess_warnings": float(self.n_ess_warnings),
                         **self._update_log}
        self._update_log = {}
        n = len(batch)
        return W[self.rank * n:(self.rank + 1) * n].float()

    def step_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    # ------------------------------------------------------------ bi-level update

    def _lookahead_lr(self, ctx: TrainContext) -> float:
        """eta: the configured rate, else the LM's scheduled rate for this step, floored at its final (min) rate
        so that a stage starting inside warm-up (stage 0 at step 0) still looks ahead."""
        if self.cfg.lookahead_lr > 0:
            return self.cfg.lookahead_lr
        o = ctx.optim
        return max(float(ctx.lr), o.lr * o.min_lr_ratio)

    def _local(self, ids: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of a global list of sample ids."""
        n = len(ids) // self.world
        return ids[self.rank * n:(self.rank + 1) * n]

    def _ref_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.reference is not None
        ref_idx = self.rng.choice(len(self.reference), size=min(self.cfg.ref_batch_size, len(self.reference)),
                                  replace=False)
        r_local = max(1, len(ref_idx) // self.world)
        ref_ids, ref_mask = self.reference.batch(ref_idx[self.rank * r_local:(self.rank + 1) * r_local])
        return ref_ids.to(self.device), ref_mask.to(self.device)

    def _probe(self, ctx: TrainContext, ids: np.ndarray, ref: tuple[torch.Tensor, torch.Tensor]):
        """dL_ref(theta')/dw_i for every sample of `ids` (global list, len a multiple of the world size): the
        lookahead is the LM's next step on the first G of them weighted by phi (a batch as the LM would see it);
        the others have weight 0 there and get the influence of weighting them in that step. Returns (the global
        dL/dw [n] float64 on the CPU, the HyperResult of this rank)."""
        cfg = self.cfg
        batch = ctx.data.batch(self._local(ids)).to(self.device)
        if cfg.probe_len:  # the hypergradient of each sample's first probe_len tokens (phi reads no more)
            batch = Batch(batch.input_ids[:, :cfg.probe_len], batch.n_tokens.clamp(max=cfg.probe_len),
                          batch.sample_ids, batch.domain_ids)
        G = min(self.G, len(ids))
        self.net.eval()
        S = self._gather(self._scores_no_grad(batch, self._lm_losses(ctx, batch)))
        w = torch.zeros_like(S)
        w[:G] = weights_from_scores(S[:G], self.temperature, self.floor)
        precond = adam_lookahead(ctx.optimizer, ctx.model) if cfg.precondition == "adam" else None
        res = hypergradient(ctx.model, batch.input_ids, batch.n_tokens, self._local(w).detach(), *ref,
                            lr=self._lookahead_lr(ctx), precond=precond, backend=cfg.backend, fd_eps=cfg.fd_eps,
                            global_batch_size=G, chunk_size=self.micro, autocast_dtype=ctx.autocast_dtype)
        return self._gather(res.dL_dw.to(S.dtype)).double().cpu(), res

    def _phi_backward(self, ctx: TrainContext, ids: np.ndarray, target: torch.Tensor) -> float:
        """phi_objective on one group of samples (a batch as the LM sees it, phi's weights gathered over ranks) and
        its gradient into phi's parameters (this rank's part; the caller sums over ranks). The weights are a softmax
        over the whole group, so the scores are computed without a graph first, the objective's gradient with
        respect to them taken, and then each micro-batch of samples is scored again with a graph and
        backpropagated with its part: the same gradient, in memory set by the chunk."""
        batch = ctx.data.batch(self._local(ids)).to(self.device)
        losses = self._lm_losses(ctx, batch)
        if not self._chunked():
            s = self._scores(batch, losses)
            loss = phi_objective(weights_from_scores(self._gather(s, keep_grad=True), self.temperature, self.floor),
                                 target, self.cfg.kl)
            loss.backward()
            return float(loss.detach())
        S = self._gather(self._scores_no_grad(batch, losses)).requires_grad_(True)
        with torch.enable_grad():
            loss = phi_objective(weights_from_scores(S, self.temperature, self.floor), target, self.cfg.kl)
            (dS,) = torch.autograd.grad(loss, S)
        n = len(batch)
        d_local = dS[self.rank * n:(self.rank + 1) * n]
        for a in range(0, n, self.micro):
            s = self._scores(batch.slice(a, a + self.micro), None if losses is None else losses[a:a + self.micro])
            s.backward(d_local[a:a + self.micro].to(s.dtype))
        return float(loss.detach())

    def _update(self, ctx: TrainContext) -> None:
        """One bi-level update: probe `batch_size` new training samples (their dL_ref(theta')/dw), add them to this
        stage's buffer, and take `phi_steps` optimizer steps of phi, each on a group of G samples drawn from the
        buffer. Never raises from the maths: a non-finite outer loss, hypergradient or phi gradient (on any rank)
        skips the update, counts it and logs why."""
        cfg = self.cfg
        assert self.optimizer is not None and self.reference is not None
        n = cfg.batch_size or self.G
        if n % self.world:
            raise UserError(f"weighting.batch_size {n} must be divisible by the number of processes {self.world}")
        ids = self.rng.choice(self.update_pool, size=min(n, len(self.update_pool)), replace=False)
        ids = ids[:len(ids) - len(ids) % self.world]
        dL_dw, res = self._probe(ctx, ids, self._ref_batch())
        ok, reason = res.ok, res.reason
        scale = float(dL_dw.std()) if cfg.normalize == "std" and len(dL_dw) > 1 else 1.0
        if ok and not (math.isfinite(scale) and scale > 0):
            ok, reason = False, f"hypergradient spread {scale} across the probed samples"
        grad_norm = math.nan
        if ok:
            self.buffer.append(Probed(ids, dL_dw.numpy(), scale, ctx.step, self.stage_of(ctx.step)))
            self._save_signal(ctx)
            all_ids = np.concatenate([b.ids for b in self.buffer])
            all_t = np.concatenate([b.target for b in self.buffer])
            self.net.train()
            for _ in range(cfg.phi_steps):
                pick = self.rng.choice(len(all_ids), size=min(self.G, len(all_ids)), replace=False)
                pick = pick[:len(pick) - len(pick) % self.world]
                self.optimizer.zero_grad(set_to_none=True)
                self._phi_backward(ctx, all_ids[pick], torch.from_numpy(all_t[pick]))
                all_reduce_([p.grad for p in self.net.parameters() if p.grad is not None])  # sum over ranks
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    self.net.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
                if not math.isfinite(grad_norm):  # same value on every rank after the all-reduce
                    ok, reason = False, "non-finite weighting-model gradient"
                    break
                self.optimizer.step()
        if ok:
            self.n_updates += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.n_skipped += 1
            log.warning("DWM: skipped a bi-level update at step %d: %s", ctx.step, reason)
        rec = {"event": "bilevel", "stage": self.stage_of(ctx.step), "ok": ok, "reason": reason,
               "ref_loss_before": res.ref_loss_before, "ref_loss_after": res.ref_loss_after,
               "hypergrad_norm": float(dL_dw.norm()) if res.ok else math.nan, "hypergrad_std": scale,
               "phi_grad_norm": grad_norm, "lookahead_lr": self._lookahead_lr(ctx), "fd_eps": res.eps_used,
               "v_norm": res.v_norm, "probed": len(ids), "buffer": sum(len(b.ids) for b in self.buffer),
               "updates": self.n_updates, "skipped": self.n_skipped}
        ctx.log(rec)
        self._update_log = {"ref_loss_before": res.ref_loss_before, "ref_loss_after": res.ref_loss_after}

    def _save_signal(self, ctx: TrainContext) -> None:
        """signal/stage_k.parquet (rank 0): every sample this stage's updates probed so far (the stage's part of
        phi's buffer), with its raw dL_ref(theta')/dw and its signal -dL/dw / (the update's spread): positive =
        weighting it up lowers the reference loss, on the scale phi fits. What the hypergradient said, next to what
        phi learned (probes/); `dwm analyze` compares the two per domain. Rewritten after every update from the
        state, so a resumed run writes the same file."""
        k = self.stage_of(ctx.step)
        if ctx.rank != 0:
            return
        mine = [b for b in self.buffer if b.stage == k]
        sid = np.concatenate([b.ids for b in mine])
        table = pa.table({
            "sample_id": pa.array(sid, pa.int64()),
            "domain": pa.array([self.domains[i] for i in ctx.data.domain_ids[sid]]),
            "dL_dw": pa.array(np.concatenate([b.dL_dw for b in mine]), pa.float64()),
            "signal": pa.array(np.concatenate([-b.target for b in mine]), pa.float64()),
            "stage": pa.array(np.full(len(sid), k), pa.int32()),
            "step": pa.array(np.concatenate([np.full(len(b.ids), b.step) for b in mine]), pa.int64()),
        })
        out = ctx.run_dir / "signal" / f"stage_{k}.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        tmp.replace(out)

    def _diagnose(self, ctx: TrainContext, when: str) -> None:
        """How much of the hypergradient phi captures, and how noisy the hypergradient is (weighting.diagnostics):
        fresh dL/dw of a fixed set of held-back training samples (never used to train phi) under two independent
        reference batches. Logs the correlation of the two (reference-side noise), the Spearman correlation of
        phi's scores with -dL/dw (capture; before and after the stage's updates), the share of the signal's
        variance that the domain explains, and the mean signal per domain."""
        if self.diag_ids is None or self.reference is None:
            return
        if when == "before" or self._diag_signal is None:
            a, _ = self._probe(ctx, self.diag_ids, self._ref_batch())
            b, _ = self._probe(ctx, self.diag_ids, self._ref_batch())
            self._diag_signal = (a.numpy(), b.numpy())
        a, b = self._diag_signal
        sig = -(a + b) / 2
        scores = self.score_samples(ctx, self.diag_ids)
        dom = ctx.data.domain_ids[self.diag_ids]
        means = {self.domains[d]: float(sig[dom == d].mean() / (np.abs(sig).mean() + 1e-300))
                 for d in np.unique(dom)}
        between = np.var([sig[dom == d].mean() for d in dom])
        ctx.log({"event": "diagnose", "when": when, "stage": self.stage_of(ctx.step),
                 "ref_noise_corr": _corr(a, b), "capture_spearman": _corr(_rank(scores), _rank(sig)),
                 "domain_r2": float(between / max(np.var(sig), 1e-300)), "signal_by_domain": means})

    # ------------------------------------------------------------ stage outputs

    def _save_stage(self, ctx: TrainContext, k: int, step: int) -> None:
        """weighting/stage_k.{safetensors,json} and probes/stage_k.parquet (rank 0: sample_id, domain, score,
        weight, stage, step, and with probe_lm_loss lm_loss, the LM's per-sample NLL at this step); every rank scores
        nothing else, so the probe pass costs only rank 0 (but for the LM's forwards under fsdp, which every rank
        runs: each gathers the shards of all)."""
        lm_loss = (self._probe_lm_loss(ctx) if self.cfg.probe_lm_loss and fsdp.is_sharded(ctx.model) else None)
        if ctx.rank != 0:
            return
        stem = ctx.run_dir / "weighting" / f"stage_{k}"
        _, js = save_weighting_net(self.net, stem)
        meta = json.loads(js.read_text())
        meta["dwm"] = {"stage": k, "stages": self.n_stages, "step": step, "total_steps": self.total_steps,
                       "fraction": [k / self.n_stages, (k + 1) / self.n_stages], "temperature": self.temperature,
                       "floor": self.floor, "domains": self.domains, "tokenizer_sha256": self.tokenizer_sha,
                       "updates": self.n_updates, "skipped": self.n_skipped,
                       "source": str(self.cfg.mode) if self.replay else None}
        js.write_text(json.dumps(meta, indent=2))
        t0 = time.perf_counter()
        scores = self.score_samples(ctx, self.probes)
        S = torch.from_numpy(scores)
        columns = {
            "sample_id": pa.array(self.probes, pa.int64()),
            "domain": pa.array([self.domains[i] for i in ctx.data.domain_ids[self.probes]]),
            "score": pa.array(scores, pa.float32()),
            "weight": pa.array(weights_from_scores(S.double(), self.temperature, self.floor).numpy(),
                               pa.float32()),
            "stage": pa.array(np.full(len(self.probes), k), pa.int32()),
            "step": pa.array(np.full(len(self.probes), step), pa.int64()),
        }
        if self.cfg.probe_lm_loss:  # for `dwm analyze`
            columns["lm_loss"] = pa.array(self._probe_lm_loss(ctx) if lm_loss is None else lm_loss, pa.float32())
        table = pa.table(columns)
        (ctx.run_dir / "probes").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, ctx.run_dir / "probes" / f"stage_{k}.parquet")
        ctx.log({"event": "stage", "stage": k, "probe_seconds": time.perf_counter() - t0,
                     "probe_weight_by_domain": {
            d: float(np.mean(table["weight"].to_numpy()[np.asarray(table["domain"].to_pylist()) == d]))
            for d in sorted(set(table["domain"].to_pylist()))}})

    def _probe_lm_loss(self, ctx: TrainContext) -> np.ndarray:
        """The LM's per-sample NLL on the probe set at this step (no grad, micro-batch chunks)."""
        out = []
        with torch.no_grad(), ctx.autocast():
            for i in range(0, len(self.probes), self.micro):
                b = ctx.data.batch(self.probes[i:i + self.micro]).to(self.device)
                out.append(per_sample_nll(ctx.model(input_ids=b.input_ids).logits, b.input_ids, b.n_tokens).cpu())
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def score_samples(self, ctx: TrainContext, ids: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Scores of training rows `ids` under the current weighting model (no batch context beyond each chunk)."""
        self.net.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(ids), batch_size):
                b = ctx.data.batch(ids[i:i + batch_size]).to(self.device)
                out.append(self._scores(b, self._lm_losses(ctx, b)).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {"net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "stage": self.stage, "rng": self.rng.bit_generator.state, "n_updates": self.n_updates,
                "probed": [(b.ids.copy(), b.dL_dw.copy(), b.spread, b.step, b.stage) for b in self.buffer],
                "n_skipped": self.n_skipped, "n_ess_warnings": self.n_ess_warnings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.net.load_state_dict(state["net"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.stage = int(state["stage"])
        self.rng.bit_generator.state = state["rng"]
        self.n_updates, self.n_skipped = int(state["n_updates"]), int(state["n_skipped"])
        self.n_ess_warnings = int(state.get("n_ess_warnings", 0))
        self.buffer = probed_records(state)


def probed_records(state: dict[str, Any]) -> list[Probed]:
    """A weighter state's buffer (DWMWeighter.state_dict()). Checkpoints written before the buffer and the signal
    records were one list kept phi's buffer as (ids, dL/dw / spread, stage) and the current stage's records apart;
    an entry without its record comes back with spread 1 and step -1 (phi's targets unchanged)."""
    if "probed" in state:
        rows = state["probed"]
    else:
        records = {(int(r[4]), np.asarray(r[0]).tobytes()): tuple(r) for r in state.get("signal", [])}
        rows = [records.get((int(k), np.asarray(i).tobytes()), (i, t, 1.0, -1, k))
                for i, t, k in state.get("buffer", [])]
    return [Probed(np.asarray(i), np.asarray(t), float(c), int(st), int(k)) for i, t, c, st, k in rows]
