"""phi's learner: its optimizer, its evidence buffer (Probed records of the last `buffer_stages` stages) and the
bi-level update, which probes new training samples (a probe: dwm.weighting.probe) and fits phi to the buffer.

Bi-level batches are drawn from the training rows by the learner's own seeded generator, so the LM's data order
and RNG streams are the same with and without DWM, and the generator is part of the checkpoint: a killed run
resumes exactly. phi's gradients are all-reduced, so a 2-process run equals a 1-process one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from dwm.errors import UserError
from dwm.nn.bilevel import all_reduce_
from dwm.weighting.probe import BilevelProbe, Probed
from dwm.weighting.scorer import Scorer

log = logging.getLogger(__name__)


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


class PhiLearner:
    """Fits the scorer's phi to the evidence its probe collects (see the module docstring). `ctx` needs what the
    probe needs (data, model, optimizer, autocast_dtype)."""

    def __init__(self, scorer: Scorer, probe: BilevelProbe, rng: np.random.Generator, *, lr: float,
                 weight_decay: float, kl: float, phi_steps: int, grad_clip: float, buffer_stages: int,
                 batch_size: int, global_batch: int):
        assert scorer.net is not None
        self.scorer, self.probe, self.rng = scorer, probe, rng
        self.optimizer = torch.optim.AdamW(scorer.net.parameters(), lr=lr, weight_decay=weight_decay)
        self.kl, self.phi_steps, self.grad_clip = kl, phi_steps, grad_clip
        self.buffer_stages, self.G = buffer_stages, global_batch
        self.n_probe = batch_size or global_batch  # training samples probed per update (global)
        self.buffer: list[Probed] = []  # phi's evidence: the last `buffer_stages` stages' probed samples
        self.n_updates = self.n_skipped = 0

    @classmethod
    def from_config(cls, scorer: Scorer, probe: BilevelProbe, rng: np.random.Generator, adv: Any,
                    global_batch: int = 1) -> PhiLearner:
        """The learner [weighting.advanced] (`adv`) describes."""
        return cls(scorer, probe, rng, lr=adv.lr, weight_decay=adv.weight_decay, kl=adv.kl, phi_steps=adv.phi_steps,
                   grad_clip=adv.grad_clip, buffer_stages=adv.buffer_stages, batch_size=adv.batch_size,
                   global_batch=global_batch)

    def add(self, probed: Probed) -> None:
        """Evidence labelled elsewhere (the training backward, backend ghost)."""
        self.buffer.append(probed)

    def enter_stage(self, k: int) -> None:
        """phi learns from the hypergradients of the last `buffer_stages` stages' LMs (the signal moves)."""
        self.buffer = [b for b in self.buffer if b.stage > k - self.buffer_stages]

    def _even(self, ids: np.ndarray) -> np.ndarray:
        return ids[:len(ids) - len(ids) % self.scorer.world]

    def phi_backward(self, ctx: Any, ids: np.ndarray, target: torch.Tensor) -> float:
        """phi_objective on one group of samples (a batch as the LM sees it, phi's weights gathered over ranks) and
        its gradient into phi's parameters (this rank's part; the caller sums over ranks). The weights are a softmax
        over the whole group, so the scores are computed without a graph first, the objective's gradient with
        respect to them taken, and then each micro-batch of samples is scored again with a graph and
        backpropagated with its part: the same gradient, in memory set by the chunk."""
        sc = self.scorer
        batch = ctx.data.batch(self.probe.local(ids)).to(sc.device)
        losses = sc.lm_losses(ctx.model, batch)
        if not sc.chunked():
            loss = phi_objective(sc.weights(sc.gather(sc.scores(batch, losses), keep_grad=True)), target, self.kl)
            loss.backward()
            return float(loss.detach())
        S = sc.gather(sc.scores_no_grad(batch, losses)).requires_grad_(True)
        with torch.enable_grad():
            loss = phi_objective(sc.weights(S), target, self.kl)
            (dS,) = torch.autograd.grad(loss, S)
        n, m = len(batch), sc.micro
        d_local = sc.local(dS, n)
        for a in range(0, n, m):
            s = sc.scores(batch.slice(a, a + m), None if losses is None else losses[a:a + m])
            s.backward(d_local[a:a + m].to(s.dtype))
        return float(loss.detach())

    def update(self, ctx: Any, pool: np.ndarray, lookahead_lr: float, step: int, stage: int) -> tuple[dict, bool]:
        """One bi-level update: probe `batch_size` new samples of `pool` (their dL_ref(theta')/dw), add them to the
        buffer, and take `phi_steps` optimizer steps of phi, each on a group of G samples drawn from the buffer.
        Never raises from the maths: a non-finite outer loss, hypergradient or phi gradient (on any rank) skips the
        update, counts it and logs why. Returns (the update's log record, whether the buffer grew)."""
        if self.n_probe % self.scorer.world:
            raise UserError(f"weighting.advanced.batch_size {self.n_probe} must be divisible by the number of "
                            f"processes {self.scorer.world}")
        streams = getattr(self.probe, "streams", False)  # the training steps label the samples (ghost)
        ids = (np.zeros(0, np.int64) if streams
               else self._even(self.rng.choice(pool, size=min(self.n_probe, len(pool)), replace=False)))
        probed, info = self.probe.collect(ctx, ids, self.rng, lookahead_lr, step, stage)
        ok, reason, grad_norm = info["ok"], info["reason"], math.nan
        if probed is not None:
            self.buffer.append(probed)
        if streams and not self.buffer:  # the first boundary: nothing labelled yet, phi keeps its start
            return {"event": "bilevel", "stage": stage, **info, "phi_grad_norm": math.nan, "probed": 0,
                    "buffer": 0, "updates": self.n_updates, "skipped": self.n_skipped}, False
        if probed is not None or streams:
            all_ids = np.concatenate([b.ids for b in self.buffer])
            all_t = np.concatenate([b.target for b in self.buffer])
            net = self.scorer.net
            net.train()
            for _ in range(self.phi_steps):
                pick = self._even(self.rng.choice(len(all_ids), size=min(self.G, len(all_ids)), replace=False))
                self.optimizer.zero_grad(set_to_none=True)
                self.phi_backward(ctx, all_ids[pick], torch.from_numpy(all_t[pick]))
                all_reduce_([p.grad for p in net.parameters() if p.grad is not None])  # sum over ranks
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    net.parameters(), self.grad_clip if self.grad_clip > 0 else float("inf")))
                if not math.isfinite(grad_norm):  # same value on every rank after the all-reduce
                    ok, reason = False, "non-finite weighting-model gradient"
                    break
                self.optimizer.step()
        if ok:
            self.n_updates += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.n_skipped += 1
            log.warning("DWM: skipped a bi-level update at step %d: %s", step, reason)
        rec = {"event": "bilevel", "stage": stage, **info, "ok": ok, "reason": reason, "phi_grad_norm": grad_norm,
               "probed": len(ids), "buffer": sum(len(b.ids) for b in self.buffer), "updates": self.n_updates,
               "skipped": self.n_skipped}
        return rec, probed is not None

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "rng": self.rng.bit_generator.state,
                "probed": [(b.ids.copy(), b.dL_dw.copy(), b.spread, b.step, b.stage) for b in self.buffer]}


def learning_parts(ctx: Any, cfg: Any, scorer: Scorer, rng: np.random.Generator, diag_ids: np.ndarray | None,
                   domains: list[str]) -> tuple[PhiLearner, Any, Any, Any]:
    """What a learning DWM needs besides phi: (its learner with the probe `cfg.backend` names, the GhostProbe
    when that is "ghost" (else None), the diagnostics when diag_ids are held back (else None), the reference
    PassageSet). Refuses, in one line, what cannot learn here (bf16 compute under fsdp, a reference batch the
    processes cannot share)."""
    from dwm.data.passages import PassageSet
    from dwm.nn import sharding
    from dwm.weighting.diagnostics import Diagnostics
    from dwm.weighting.ghost_probe import GhostProbe

    adv, world = cfg.advanced, ctx.world_size
    micro, G = ctx.plan.micro_batch_size, ctx.plan.global_batch_size
    if sharding.compute_dtype(ctx.model) in sharding.LOW_PRECISION:  # fails at attach, not at the first update
        raise UserError("the bi-level update's finite differences need float32 compute, but fsdp computes in "
                        "bf16 here: set train.precision=fp32 (or train.parallel=ddp: fp32 weights under "
                        "bf16 autocast)")
    reference = PassageSet(cfg.reference, ctx.tokenizer, max_len=ctx.plan.seq_len, mode=adv.ref_loss,
                           pad_id=ctx.data.pad_id)
    if adv.ref_batch_size % world:
        raise UserError(f"weighting.advanced.ref_batch_size {adv.ref_batch_size} must be divisible by the "
                        f"number of processes {world}")
    ghost = None
    if cfg.backend == "ghost":
        probe = ghost = GhostProbe.from_config(scorer, reference, cfg, micro, G)
        ghost.attach(ctx)
    else:
        probe = BilevelProbe.from_config(scorer, reference, cfg, micro, G)
    learner = PhiLearner.from_config(scorer, probe, rng, adv, G)
    diagnostics = None
    if diag_ids is not None:  # measured by the lookahead (fd) whatever the evidence
        diag_probe = probe if ghost is None else BilevelProbe(scorer, reference, ref_batch_size=adv.ref_batch_size,
                                                              micro=micro, global_batch=G)
        diagnostics = Diagnostics(diag_probe, diag_ids, domains)
    return learner, ghost, diagnostics, reference
