"""Per-domain online mixtures, DWM's peers: DoGE-style (weighting.mode = doge) and ODM (weighting.mode = odm).

Each is a weighter that keeps a distribution q over the domains (`DomainPolicy`) and a selector that draws every
batch by it (`DomainMixSelector`, "domain-mix"): from the next `candidates` x G samples of the data stream, G are
drawn with probability q_d / n_d for a candidate of domain d (n_d: that domain's candidates), so that a domain's
expected share of the batch is q_d renormalised over the domains present (within the draw's cap with "gumbel"),
and trained at weight 1. The weighter and the selector hold the same policy object (as the DWM's weighter and
resampling selector hold one scorer). Configs: dwm/weighting/mixing_config.py.

- DoGE: after each step, the trained samples' < P grad L_ref, grad l_i > (dwm.nn.ghost: read in the step's own
  backward) are averaged per domain, divided by their spread over the batch, and added to log q times `lr`.
- ODM: EXP3 on the training loss, the per-sample losses of the step's own forward (`needs_losses`).
Under DDP the per-domain sums are all-reduced, so every rank holds the same q.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dwm.data.batch import Batch
from dwm.data.passages import PassageSet
from dwm.nn.ghost import GhostScores, reference_direction
from dwm.nn.sampling import draw
from dwm.train.context import TrainContext
from dwm.train.distributed import is_dist
from dwm.train.selector import OnlineSelector, SelectorConfig
from dwm.train.weighter import Weighter
from dwm.weighting.ghost_probe import refuse_unhookable
from dwm.weighting.mixing_config import DoGEConfig, ODMConfig
from dwm.weighting.probe import reference_draw
from dwm.weighting.resample import ResampleSelector


class DomainPolicy:
    """A distribution q over K domains, and what drawing by it means for a list of candidates."""

    def __init__(self, K: int, candidates: float, how: str):
        self.q = np.full(K, 1.0 / K)
        self.candidates, self.draw = candidates, how

    def candidate_probs(self, domain_ids: np.ndarray) -> np.ndarray:
        """p_i = q_{d_i} / n_{d_i} / Z over the candidates (Z: q's mass on the domains present)."""
        d = np.asarray(domain_ids, dtype=np.int64)
        n = np.bincount(d, minlength=len(self.q)).astype(np.float64)
        present = n > 0
        return self.q[d] / n[d] / self.q[present].sum()


class DomainMixSelector(ResampleSelector):
    """Draws each batch by the weighter's domain policy (see the module docstring)."""

    name = "domain-mix"
    config_section = None
    what = "drawing by the domain mixture"

    def __init__(self, cfg: SelectorConfig | None = None, *, scorer: DomainPolicy):
        OnlineSelector.__init__(self, SelectorConfig(mode=self.name, every=1, candidates=scorer.candidates))
        self.scorer, self.how = scorer, scorer.draw

    def score(self, ctx: TrainContext, ids: np.ndarray) -> np.ndarray:
        return np.zeros(len(ids))

    def keep(self, ctx: TrainContext, ids: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
        return ids[draw(self.scorer.candidate_probs(ctx.data.domain_ids[ids]), n, self.rng, self.how)]


def domain_sums(values: torch.Tensor, domain_ids: torch.Tensor, K: int) -> torch.Tensor:
    """[3, K] float64: per domain the sum of `values`, the sum of their squares and the count, summed over ranks."""
    v, d = values.detach().double().cpu(), domain_ids.detach().cpu().long()
    out = torch.stack([torch.zeros(K, dtype=torch.float64).index_add_(0, d, x) for x in (v, v * v, torch.ones_like(v))])
    if is_dist():
        out = out.to(values.device)
        dist.all_reduce(out)
        out = out.cpu()
    return out


class MixWeighter(Weighter):
    """The shared part: weight-1 batches, the trained shares and q as metrics (subclasses own q and its state)."""

    selector = "domain-mix"

    def attach(self, ctx: TrainContext) -> None:
        self.domains = list(ctx.data.domains)
        self.K = len(self.domains)
        self._metrics: dict[str, float] = {}
        ctx.log({"event": f"{self.name}_attach", "domains": self.domains, **self.cfg.__dict__})

    def weights(self, batch: Batch, losses: torch.Tensor | None = None) -> torch.Tensor:
        w = torch.ones(len(batch), dtype=torch.float32, device=batch.input_ids.device)
        s = domain_sums(w, batch.domain_ids, self.K)[2]
        self._metrics = {**{f"share/{d}": float(s[i] / s.sum()) for i, d in enumerate(self.domains) if s[i] > 0},
                         **{f"mix/{d}": float(q) for d, q in zip(self.domains, self.policy.q, strict=True)}}
        return w

    def step_metrics(self) -> dict[str, float]:
        return dict(self._metrics)


class ODMWeighter(MixWeighter):
    """Online Data Mixing: EXP3 over the domains on the training loss (dwm/weighting/mixing_config.py, ODMConfig)."""

    name = "odm"
    config_section = "odm"
    needs_losses = True

    def __init__(self, cfg: ODMConfig | None = None):
        self.cfg = cfg or ODMConfig()
        self.policy = self.scorer = DomainPolicy(1, self.cfg.candidates, self.cfg.draw)  # the selector's too
        self.R: np.ndarray | None = None
        self.eps_prev = 0.0

    def attach(self, ctx: TrainContext) -> None:
        self.policy.q = np.full(len(ctx.data.domains), 1.0 / len(ctx.data.domains))
        if self.R is None:
            self.R = np.zeros(len(ctx.data.domains))
        super().attach(ctx)

    def before_step(self, ctx: TrainContext, step: int) -> None:
        """q for step `step` (t = step + 1) from the rewards so far."""
        assert self.R is not None
        K, t = self.K, step + 1
        eps = min(1.0 / K, math.sqrt(math.log(K) / (K * t))) if K > 1 else 1.0
        z = self.eps_prev * self.R
        e = np.exp(z - z.max())
        self.policy.q = (1 - K * eps) * e / e.sum() + eps
        self.eps_prev = eps

    def weights(self, batch: Batch, losses: torch.Tensor | None = None) -> torch.Tensor:
        assert self.R is not None and losses is not None
        s = domain_sums(losses, batch.domain_ids, self.K)
        seen = s[2].numpy() > 0
        mean = s[0].numpy()[seen] / s[2].numpy()[seen]
        a = self.cfg.smoothing
        self.R[seen] = a * self.R[seen] + (1 - a) * mean / self.policy.q[seen]
        return super().weights(batch, losses)

    def state_dict(self) -> dict[str, Any]:
        return {"R": None if self.R is None else self.R.copy(), "eps_prev": self.eps_prev}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.R, self.eps_prev = np.asarray(state["R"], dtype=np.float64), float(state["eps_prev"])


class DoGEWeighter(MixWeighter):
    """DoGE-style exponentiated-gradient domain weights on the first-order hypergradient (DoGEConfig)."""

    name = "doge"
    config_section = "doge"

    def __init__(self, cfg: DoGEConfig | None = None):
        self.cfg = cfg or DoGEConfig()
        self.policy = self.scorer = DomainPolicy(1, self.cfg.candidates, self.cfg.draw)  # the selector's too
        self.log_q: np.ndarray | None = None
        self.M: dict[str, torch.Tensor] | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (domain ids, loss factors) of the armed step
        self.last_g: np.ndarray | None = None
        self.ghost: GhostScores | None = None

    def attach(self, ctx: TrainContext) -> None:
        refuse_unhookable(ctx, "weighting.mode = doge", "use ddp")
        K = len(ctx.data.domains)
        if self.log_q is None:
            share = np.bincount(ctx.data.domain_ids[ctx.pool], minlength=K) / len(ctx.pool)
            self.log_q = np.log(np.clip(share if self.cfg.init == "corpus" else np.full(K, 1.0 / K), 1e-12, None))
        self.reference = PassageSet(self.cfg.reference, ctx.tokenizer, max_len=ctx.plan.seq_len,
                                    pad_id=ctx.data.pad_id)
        self.rng = np.random.default_rng([ctx.seed, 0xD06E])
        self.ghost = GhostScores(ctx.model)
        if self.M is not None:
            self.ghost.set_direction(self.M)
        self._ctx = ctx
        self._set_q()
        super().attach(ctx)

    def _set_q(self) -> None:
        assert self.log_q is not None
        e = np.exp(self.log_q - self.log_q.max())
        self.policy.q = e / e.sum()

    def before_step(self, ctx: TrainContext, step: int) -> None:
        self._harvest()
        if self.M is None or step % self.cfg.ref_every == 0:
            ids, mask = reference_draw(self.reference, self.cfg.ref_batch_size, self.rng, ctx.rank, ctx.world_size,
                                       ctx.device)
            self.M, _ = reference_direction(ctx.model, ids, mask, ctx.optimizer, chunk_size=ctx.plan.micro_batch_size,
                                            autocast_dtype=ctx.autocast_dtype)
            self.ghost.set_direction(self.M)
        self.ghost.collect()  # nothing recorded before this step counts
        self.ghost.start()
        self.pending = None

    def weights(self, batch: Batch, losses: torch.Tensor | None = None) -> torch.Tensor:
        w = super().weights(batch, losses)
        self.pending = (batch.domain_ids.detach().cpu(), (w.double() / len(w)).cpu())
        return w

    def _harvest(self) -> None:
        """The finished step's per-domain signal into log q (every rank: the sums are all-reduced)."""
        assert self.ghost is not None
        self.ghost.stop()
        p, self.pending = self.pending, None
        if p is None:
            self.ghost.collect()
            return
        scores = self.ghost.collect(p[1])
        if scores.numel() != len(p[0]):
            return
        s = domain_sums(scores, p[0], self.K)
        n = s[2].sum()
        std = math.sqrt(max(float(s[1].sum() / n - (s[0].sum() / n) ** 2), 0.0))
        seen = (s[2] > 0).numpy()
        if not (std > 0 and math.isfinite(std)):
            return
        g = np.zeros(self.K)
        g[seen] = (s[0].numpy()[seen] / s[2].numpy()[seen]) / std
        assert self.log_q is not None
        self.log_q = self.log_q + self.cfg.lr * g
        self.last_g = g
        self._set_q()

    def state_dict(self) -> dict[str, Any]:
        self._harvest()  # the finished step's update belongs to this checkpoint (a collective under DDP)
        return {"log_q": None if self.log_q is None else self.log_q.copy(), "rng": self.rng.bit_generator.state,
                "M": None if self.M is None else {k: v.detach().cpu().clone() for k, v in self.M.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.log_q = np.asarray(state["log_q"], dtype=np.float64)
        self.rng.bit_generator.state = state["rng"]
        if state.get("M") is not None:
            self.M = {k: v.to(self._ctx.device) for k, v in state["M"].items()}
            self.ghost.set_direction(self.M)
        self._set_q()
