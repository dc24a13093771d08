"""Where phi's evidence comes from: a probe measures, for a list of training samples, how weighting each of them
in the LM's next step would change the reference loss (dL_ref(theta')/dw), and returns it as a `Probed` record.

`BilevelProbe` is the lookahead hypergradient (dwm.nn.bilevel.hypergradient, backends "fd" and "exact"). Another
source of evidence is another class with the same `measure` / `collect` methods, handed to the learner
(dwm.weighting.learner.PhiLearner) in place of this one.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from dwm.data.batch import Batch
from dwm.nn.bilevel import HyperResult, hypergradient
from dwm.nn.lookahead import adam_lookahead
from dwm.weighting.scorer import Scorer


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


def reference_draw(reference: Any, size: int, rng: np.random.Generator, rank: int, world: int,
                   device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` reference passages drawn without replacement (every rank draws the same), this rank's share of them
    as (input_ids, loss_mask) on `device`."""
    ref_idx = rng.choice(len(reference), size=min(size, len(reference)), replace=False)
    r_local = max(1, len(ref_idx) // world)
    ref_ids, ref_mask = reference.batch(ref_idx[rank * r_local:(rank + 1) * r_local])
    return ref_ids.to(device), ref_mask.to(device)


class BilevelProbe:
    """dL_ref(theta')/dw_i of training samples by one lookahead step of the LM (see the module docstring).

    `ctx` needs: data (rows with .batch(ids)), model, optimizer, autocast_dtype; `lookahead_lr` is the step's eta.
    """

    def __init__(self, scorer: Scorer, reference: Any, *, backend: str = "fd", fd_eps: float = 1e-2,
                 precondition: str = "adam", probe_len: int = 0, ref_batch_size: int = 16, normalize: str = "std",
                 micro: int = 1, global_batch: int = 1, expected_draw: float = 0.0):
        self.scorer, self.reference = scorer, reference
        self.expected_draw = expected_draw  # > 0: the LM's step is a systematic draw of G from this x G candidates
        self.backend, self.fd_eps, self.precondition = backend, fd_eps, precondition
        self.probe_len, self.ref_batch_size, self.normalize = probe_len, ref_batch_size, normalize
        self.micro, self.G = micro, global_batch

    @classmethod
    def from_config(cls, scorer: Scorer, reference: Any, cfg: Any, micro: int, global_batch: int = 1) -> BilevelProbe:
        """The probe a WeightingConfig describes (backend; fd_eps, precondition, ... from [weighting.advanced])."""
        a = cfg.advanced
        return cls(scorer, reference, backend=cfg.backend, fd_eps=a.fd_eps, precondition=a.precondition,
                   probe_len=a.probe_len, ref_batch_size=a.ref_batch_size, normalize=a.normalize, micro=micro,
                   global_batch=global_batch,
                   expected_draw=cfg.candidates if cfg.apply == "resample" and a.draw == "systematic" else 0.0)

    def local(self, ids: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of a global list of sample ids."""
        n = len(ids) // self.scorer.world
        return ids[self.scorer.rank * n:(self.scorer.rank + 1) * n]

    def ref_batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A draw of reference passages (this rank's share), from the learner's generator."""
        sc = self.scorer
        return reference_draw(self.reference, self.ref_batch_size, rng, sc.rank, sc.world, sc.device)

    def measure(self, ctx: Any, ids: np.ndarray, ref: tuple[torch.Tensor, torch.Tensor],
                lookahead_lr: float) -> tuple[torch.Tensor, HyperResult]:
        """dL_ref(theta')/dw_i for every sample of `ids` (global list, len a multiple of the world size): the
        lookahead is the LM's next step on the first G of them weighted by phi (a batch as the LM would see it; with
        systematic resampling, the expected step: the first candidates x G weighted G p_i);
        the others have weight 0 there and get the influence of weighting them in that step. Returns (the global
        dL/dw [n] float64 on the CPU, the HyperResult of this rank)."""
        sc = self.scorer
        batch = ctx.data.batch(self.local(ids)).to(sc.device)
        if self.probe_len:  # the hypergradient of each sample's first probe_len tokens (phi reads no more)
            batch = Batch(batch.input_ids[:, :self.probe_len], batch.n_tokens.clamp(max=self.probe_len),
                          batch.sample_ids, batch.domain_ids)
        G = min(self.G, len(ids))
        sc.net.eval()
        S = sc.gather(sc.scores_no_grad(batch, sc.lm_losses(ctx.model, batch)))
        w = torch.zeros_like(S)
        if self.expected_draw > 0:  # the step a systematic draw takes in expectation: G p_i over the candidates
            C = min(len(ids), round(self.expected_draw * G))
            w[:C] = sc.weights(S[:C]) * (G / C)
        else:  # a batch as the LM sees it with in-batch weights (and, approximately, a Gumbel draw)
            w[:G] = sc.weights(S[:G])
        precond = adam_lookahead(ctx.optimizer, ctx.model) if self.precondition == "adam" else None
        res = hypergradient(ctx.model, batch.input_ids, batch.n_tokens, self.local(w).detach(), *ref,
                            lr=lookahead_lr, precond=precond, backend=self.backend, fd_eps=self.fd_eps,
                            global_batch_size=G, chunk_size=self.micro, autocast_dtype=ctx.autocast_dtype)
        return sc.gather(res.dL_dw.to(S.dtype)).double().cpu(), res

    def collect(self, ctx: Any, ids: np.ndarray, rng: np.random.Generator, lookahead_lr: float, step: int,
                stage: int) -> tuple[Probed | None, dict[str, Any]]:
        """One probe of `ids` against a fresh reference draw: the Probed record (None when the maths failed) and
        what the update's log record says of it."""
        dL_dw, res = self.measure(ctx, ids, self.ref_batch(rng), lookahead_lr)
        ok, reason = res.ok, res.reason
        scale = float(dL_dw.std()) if self.normalize == "std" and len(dL_dw) > 1 else 1.0
        if ok and not (math.isfinite(scale) and scale > 0):
            ok, reason = False, f"hypergradient spread {scale} across the probed samples"
        rec = {"ok": ok, "reason": reason, "ref_loss_before": res.ref_loss_before,
               "ref_loss_after": res.ref_loss_after, "hypergrad_norm": float(dL_dw.norm()) if res.ok else math.nan,
               "hypergrad_std": scale, "lookahead_lr": lookahead_lr, "fd_eps": res.eps_used, "v_norm": res.v_norm}
        return (Probed(ids, dL_dw.numpy(), scale, step, stage) if ok else None), rec
