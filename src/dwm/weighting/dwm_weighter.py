"""DWMWeighter: the Data Weighting Model inside the trainer, wired from its parts.

    scores s = f_phi(batch)  ->  w = B * softmax(s / tau) over the *global* batch  ->  LM minimises (1/B) sum w_i l_i

- scorer.py: phi and its weights, one object shared with the resampling selector (resample.py, apply = resample)
- schedule.py: the stages (staged / interleaved) and replay of another run's stage models (transfer)
- probe.py + learner.py: where phi's evidence comes from (the bi-level hypergradient) and how phi fits it
- outputs.py + diagnostics.py: weighting/, probes/ and signal/ files; logged statistics

With apply = "weights" the batch is weighted by phi (the paper's in-batch variant); with apply = "resample" the
selector has already drawn the batch by phi's scores, so every drawn sample trains at weight 1 and the weighter
logs the batch's domain shares. Under DDP each rank scores its share and the softmax runs over the gathered
global batch; phi's gradients are all-reduced, so a 2-process run equals a 1-process one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dwm.data.batch import Batch
from dwm.errors import UserError
from dwm.train.context import TrainContext
from dwm.train.weighter import Weighter
from dwm.weighting.config import WeightingConfig
from dwm.weighting.diagnostics import Diagnostics, EssWatch, weight_stats
from dwm.weighting.ghost_probe import GhostProbe
from dwm.weighting.learner import PhiLearner, learning_parts
from dwm.weighting.net import WeightingNet, fresh_net
from dwm.weighting.outputs import StageWriter, probe_ids
from dwm.weighting.probe import probed_records
from dwm.weighting.schedule import StageSchedule, StageSource
from dwm.weighting.scorer import Scorer


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class DWMWeighter(Weighter):
    name = "dwm"
    config_section = "weighting"

    def __init__(self, cfg: WeightingConfig):
        super().__init__(cfg)
        self.cfg: WeightingConfig = cfg
        self.needs_losses = cfg.net.use_loss_feature  # the trainer hands weights() the training forward's losses
        self.replay = cfg.mode not in ("dwm", "uniform")
        self.learn = not self.replay or cfg.keep_learning
        self.in_batch = cfg.apply == "weights"
        self.selector = None if self.in_batch else "dwm"  # resample: the "dwm" selector draws with our scorer
        self.scorer = Scorer(cfg.temperature, cfg.floor, cfg.net.use_loss_feature)
        self.stage = -1
        self.ess = EssWatch(cfg.advanced.min_ess_fraction)
        self.learner: PhiLearner | None = None
        self.ghost: GhostProbe | None = None  # backend ghost: the training backward labels every sample
        self.diagnostics: Diagnostics | None = None
        self._metrics: dict[str, float] = {}
        self._update_log: dict[str, float] = {}

    # ------------------------------------------------------------ setup

    def attach(self, ctx: TrainContext) -> None:
        cfg, world = self.cfg, ctx.world_size
        self._ctx = ctx
        self.domains = list(ctx.data.domains)
        self.tokenizer_sha = file_sha256(ctx.data.tokenizer_path)
        self.source = StageSource(cfg.mode, self.tokenizer_sha) if self.replay else None
        adv = cfg.advanced
        self.schedule = StageSchedule.from_config(cfg, self.source.n_stages if self.source else cfg.stages,
                                                  ctx.total_steps)
        if self.source is not None:  # replayed as learned: the source's temperature and floor
            self.scorer.temperature = self.source.setting("temperature", cfg.temperature)
            self.scorer.floor = self.source.setting("floor", cfg.floor)
        net = self.source.load(0, self.domains) if self.source is not None else fresh_net(ctx, cfg.net, len(self.domains))
        net.to(ctx.device, dtype=next(ctx.model.parameters()).dtype)  # fp64 runs: checks
        self.needs_losses = net.cfg.use_loss_feature  # a replayed net decides for itself
        micro = ctx.plan.micro_batch_size
        self.scorer.bind(net, ctx.device, micro, ctx.rank, world)
        self.update_pool, diag_ids = ctx.pool, None
        if self.learn and adv.diagnostics:  # held back: never drawn for phi's updates
            drng = np.random.default_rng([ctx.seed, 0xD1A6])
            n_diag = min(adv.diagnostics_size, len(ctx.pool) // 2)
            diag_ids = np.sort(drng.choice(ctx.pool, n_diag - n_diag % world, replace=False))
            self.update_pool = np.setdiff1d(ctx.pool, diag_ids)
        self.rng = np.random.default_rng([ctx.seed, 0xD3])
        reference = None
        if self.learn:
            self.learner, self.ghost, self.diagnostics, reference = learning_parts(
                ctx, cfg, self.scorer, self.rng, diag_ids, self.domains)
        probes = probe_ids(ctx.data.domain_ids, min(cfg.probe_size, len(ctx.data)))
        self.writer = StageWriter(self.scorer, self.domains, probes, probe_lm_loss=adv.probe_lm_loss, micro=micro)
        if world > 1 and cfg.net.batch_context:
            raise UserError("weighting.net.batch_context attends across the batch and is single-process only; "
                            "under DDP each rank would see a different context")
        ctx.log({"event": "dwm_attach", "mode": "replay" if self.replay else "learn", "learn": self.learn,
                 "stages": self.schedule.n_stages, "updates_per_stage": self.schedule.updates_per_stage,
                 "weighting_params": sum(p.numel() for p in net.parameters()),
                 "reference_passages": len(reference) if reference is not None else 0})

    @property
    def net(self) -> WeightingNet:
        return self.scorer.net

    @property
    def temperature(self) -> float:
        return self.scorer.temperature

    # ------------------------------------------------------------ schedule

    def before_step(self, ctx: TrainContext, step: int) -> None:
        k = self.schedule.stage_of(step)
        if self.ghost is not None:
            self._harvest(ctx)
        if k != self.stage:
            self._enter_stage(ctx, k, step)
        elif self.learner is not None and self.schedule.updates_within(step) and self.schedule.learns(k):
            self._update(ctx)
        if self.ghost is not None and self.schedule.learns(k):
            if self.ghost.M is None or step % self.cfg.advanced.ref_every == 0:
                self.ghost.refresh(ctx, self.rng)
            self.ghost.arm(step, k, self._lookahead_lr(ctx))

    def _harvest(self, ctx: TrainContext) -> None:
        """Backend ghost: the finished step's labelled samples into phi's buffer (and signal/). Every rank calls it."""
        assert self.ghost is not None and self.learner is not None
        self.ghost.harvest_into(ctx, self.learner, self.writer, self.schedule.stage_of)

    def _enter_stage(self, ctx: TrainContext, k: int, step: int) -> None:
        if self.source is not None and self.source.n_stages > 1 and k > 0:
            self.net.load_state_dict(self.source.load(k, self.domains).state_dict())
            if self.learner is not None:  # a fresh start from the replayed model: drop stale moments
                self.learner.optimizer.state.clear()
        if self.learner is not None and self.schedule.learns(k):
            self.learner.enter_stage(k)
            self._diagnose(ctx, "before")
            for _ in range(self.schedule.updates_at_boundary(step)):
                self._update(ctx)
            self._diagnose(ctx, "after")
            if self.ghost is not None and self.ghost.heldout:
                ctx.log(self.ghost.holdout_report(
                    k - 1, lambda ids: self.scorer.score_ids(ctx.data, ids, ctx.model)))
        self.stage = k
        self.writer.save_stage(ctx, k, step, self._stage_meta(k, step))

    def _stage_meta(self, k: int, step: int) -> dict[str, Any]:
        s = self.schedule
        return {"stage": k, "stages": s.n_stages, "step": step, "total_steps": s.total_steps,
                "fraction": s.fraction(k), "temperature": self.scorer.temperature, "floor": self.scorer.floor,
                "apply": self.cfg.apply, "candidates": self.cfg.candidates, "draw": self.cfg.advanced.draw,
                "domains": self.domains, "tokenizer_sha256": self.tokenizer_sha, "updates": self.n_updates,
                "skipped": self.n_skipped, "source": str(self.cfg.mode) if self.replay else None}

    def _lookahead_lr(self, ctx: TrainContext) -> float:
        """eta: the configured rate, else the LM's scheduled rate for this step, floored at its final (min) rate
        so that a stage starting inside warm-up (stage 0 at step 0) still looks ahead."""
        if self.cfg.advanced.lookahead_lr > 0:
            return self.cfg.advanced.lookahead_lr
        return max(float(ctx.lr), ctx.optim.lr * ctx.optim.min_lr_ratio)

    def _update(self, ctx: TrainContext) -> None:
        assert self.learner is not None
        k = self.schedule.stage_of(ctx.step)
        rec, grew = self.learner.update(ctx, self.update_pool, self._lookahead_lr(ctx), ctx.step, k)
        if grew:
            self.writer.save_signal(ctx, self.learner.buffer, k)
        ctx.log(rec)
        self._update_log = {"ref_loss_before": rec["ref_loss_before"], "ref_loss_after": rec["ref_loss_after"]}

    def _diagnose(self, ctx: TrainContext, when: str) -> None:
        if self.diagnostics is not None:
            self.diagnostics.run(ctx, when, self.rng, self._lookahead_lr(ctx), self.schedule.stage_of(ctx.step))

    @property
    def n_updates(self) -> int:
        return self.learner.n_updates if self.learner is not None else 0

    @property
    def n_skipped(self) -> int:
        return self.learner.n_skipped if self.learner is not None else 0

    # ------------------------------------------------------------ weights

    def weights(self, batch: Batch, losses: torch.Tensor | None = None) -> torch.Tensor:
        sc, n = self.scorer, len(batch)
        batch = batch.to(sc.device)
        counters = {"dwm_stage": float(self.stage), "dwm_updates": float(self.n_updates),
                    "dwm_skipped": float(self.n_skipped)}
        if not self.in_batch:  # the batch was drawn by phi's scores: every drawn sample counts once
            W = torch.ones(n * sc.world, device=sc.device)
            stats = weight_stats(W, sc.gather(batch.domain_ids), self.domains)
            self._metrics = {**{k: v for k, v in stats.items() if k.startswith("share/")}, **counters,
                             **self._update_log}
        else:
            W = sc.batch_weights(batch, losses)
            stats = weight_stats(W, sc.gather(batch.domain_ids), self.domains)
            self.ess.check(stats["w_ess"], W.numel())
            self._metrics = {**stats, **counters, "dwm_ess_warnings": float(self.ess.count), **self._update_log}
        self._update_log = {}
        w_local = sc.local(W, n).float()
        if self.ghost is not None:
            self.ghost.note(batch.sample_ids, w_local)
        return w_local

    def step_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        if self.ghost is not None:  # the finished step's labels belong to this checkpoint (a collective)
            self._harvest(self._ctx)
        learner = self.learner.state_dict() if self.learner is not None else {"optimizer": None, "probed": []}
        return {"ghost": self.ghost.state_dict() if self.ghost is not None else None,
                "net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
                "optimizer": learner["optimizer"], "stage": self.stage, "rng": self.rng.bit_generator.state,
                "n_updates": self.n_updates, "probed": learner["probed"], "n_skipped": self.n_skipped,
                "n_ess_warnings": self.ess.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.net.load_state_dict(state["net"])
        self.stage = int(state["stage"])
        self.rng.bit_generator.state = state["rng"]
        self.ess.count = int(state.get("n_ess_warnings", 0))
        if self.ghost is not None and state.get("ghost"):
            self.ghost.load_state_dict(state["ghost"], self.scorer.device)
        if self.learner is not None:
            if state.get("optimizer") is not None:
                self.learner.optimizer.load_state_dict(state["optimizer"])
            self.learner.n_updates, self.learner.n_skipped = int(state["n_updates"]), int(state["n_skipped"])
            self.learner.buffer = probed_records(state)
