"""weighting.backend = "ghost": phi's evidence is every sample the LM trains on, labelled in its own backward.

At each LM step the hooks of dwm.nn.ghost read < M, grad l_i(theta) > for every trained sample, M = P grad L_ref
(AdamW's diagonal times a reference batch's gradient, refreshed every `advanced.ref_every` steps). The step's
samples become one `Probed` record with dL/dw = -(lr / G) x that product, the lookahead hypergradient's first-order
value (docs/METHOD.md section 12), normalised by its spread over the step like a probe's. phi then fits the
records at the stage boundaries (the learner's buffer) instead of 128 probed samples an update. A share
(`advanced.holdout`, by sample id) is held back from the fit; after each fit the Spearman correlation of phi's
scores with their signal is logged ("ghost_holdout").

Under DDP each rank scores its own rows; the records hold the gathered global batch. M and the step not yet
harvested are part of the checkpoint, so a resumed run labels the same samples with the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from dwm.errors import UserError
from dwm.nn.ghost import GhostScores, reference_direction
from dwm.weighting.diagnostics import corr, rank
from dwm.weighting.probe import BilevelProbe, Probed


def refuse_unhookable(ctx: Any, who: str, instead: str) -> None:
    """One-line errors where GhostScores' hooks cannot read the LM: under torch.compile (hooks bypassed) and on a
    sharded LM (a sharded M). `who` names the setting, `instead` what to use on a sharded LM."""
    if ctx.compiled:
        raise UserError(f"{who} reads the LM's layers through hooks, which torch.compile bypasses: set "
                        "train.compile = false")
    if any(type(p).__name__ == "DTensor" for p in ctx.model.parameters()):
        raise UserError(f"{who} does not run on a sharded LM (train.parallel = fsdp) yet: {instead}")


class GhostProbe(BilevelProbe):
    """Evidence from the training backward (see the module docstring); `streams`: no samples are probed at an
    update, the learner fits what the steps labelled."""

    streams = True

    def __init__(self, scorer: Any, reference: Any, *, ref_every: int, ref_batch_size: int, holdout: float,
                 normalize: str, micro: int, global_batch: int):
        super().__init__(scorer, reference, backend="ghost", ref_batch_size=ref_batch_size, normalize=normalize,
                         micro=micro, global_batch=global_batch)
        self.ref_every, self.holdout = ref_every, holdout
        self.ghost: GhostScores | None = None
        self.M: dict[str, torch.Tensor] | None = None
        self.pending: dict[str, Any] | None = None  # the step whose backward is being scored
        self.heldout: list[tuple[np.ndarray, np.ndarray, int]] = []  # (ids, signal, stage)

    @classmethod
    def from_config(cls, scorer: Any, reference: Any, cfg: Any, micro: int, global_batch: int = 1) -> GhostProbe:
        a = cfg.advanced
        return cls(scorer, reference, ref_every=a.ref_every, ref_batch_size=a.ref_batch_size, holdout=a.holdout,
                   normalize=a.normalize, micro=micro, global_batch=global_batch)

    def attach(self, ctx: Any) -> None:
        refuse_unhookable(ctx, "weighting.backend = ghost", "use ddp, or backend 'fd'")
        self.ghost = GhostScores(ctx.model)
        if self.M is not None:
            self.ghost.set_direction(self.M)

    # ------------------------------------------------------------ per step

    def refresh(self, ctx: Any, rng: np.random.Generator) -> float:
        """M = P grad L_ref(theta) on a fresh reference draw; returns L_ref(theta)."""
        assert self.ghost is not None
        ref_ids, ref_mask = self.ref_batch(rng)
        self.M, loss = reference_direction(ctx.model, ref_ids, ref_mask, ctx.optimizer, chunk_size=self.micro,
                                           autocast_dtype=ctx.autocast_dtype)
        self.ghost.set_direction(self.M)
        return loss

    def arm(self, step: int, stage: int, lr: float) -> None:
        """Score the backward of step `step` (its batch and weights arrive through `note`)."""
        assert self.ghost is not None
        self.pending = {"step": step, "stage": stage, "lr": lr, "ids": None, "scale": None}
        self.ghost.collect()  # nothing recorded before this step counts
        self.ghost.start()

    def note(self, sample_ids: torch.Tensor, w_local: torch.Tensor) -> None:
        """The batch the coming backward trains on, and the factor its loss puts on each row (w_i / B_local)."""
        if self.pending is not None:
            self.pending["ids"] = sample_ids.detach().cpu()
            self.pending["scale"] = (w_local.detach().double() / len(w_local)).cpu()

    def harvest(self) -> Probed | None:
        """The armed step's record (None when nothing was armed, or the step's numbers are unusable); the
        held-back share goes to `heldout`. Every rank calls it (the scores are gathered)."""
        assert self.ghost is not None
        self.ghost.stop()
        p, self.pending = self.pending, None
        if p is None or p["ids"] is None:
            self.ghost.collect()
            return None
        sc = self.scorer
        scores = self.ghost.collect(p["scale"]).to(sc.device)
        if scores.numel() != len(p["ids"]):  # a step whose forwards did not all record: no evidence
            return None
        ids = sc.gather(p["ids"].to(sc.device)).cpu().numpy()
        prod = sc.gather(scores).double().cpu().numpy()
        dL_dw = -(p["lr"] / len(ids)) * prod
        scale = float(dL_dw.std()) if self.normalize == "std" and len(dL_dw) > 1 else 1.0
        if not (np.all(np.isfinite(dL_dw)) and math.isfinite(scale) and scale > 0):
            return None
        held = self._held(ids)
        if held.any():
            self.heldout.append((ids[held], -dL_dw[held] / scale, p["stage"]))
        return Probed(ids[~held], dL_dw[~held], scale, p["step"], p["stage"])

    def harvest_into(self, ctx: Any, learner: Any, writer: Any, stage_of: Any) -> None:
        """`harvest` into the learner's buffer; every ref_every steps, and at a stage's end, the stage's records
        are written to signal/ too (`writer.save_signal`)."""
        rec = self.harvest()
        if rec is None:
            return
        learner.add(rec)
        if (rec.step + 1) % self.ref_every == 0 or stage_of(rec.step + 1) != rec.stage:
            writer.save_signal(ctx, learner.buffer, rec.stage)

    def _held(self, ids: np.ndarray) -> np.ndarray:
        """A fixed share of sample ids (by a multiplicative hash), never fitted."""
        return ((ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(1000)) < round(1000 * self.holdout)

    def holdout_report(self, stage: int, score_ids: Any) -> dict[str, Any]:
        """Spearman of phi's current scores (`score_ids(ids) -> scores`) against the held-back samples' signal:
        those labelled in stage `stage` and all so far."""
        rec: dict[str, Any] = {"event": "ghost_holdout", "stage": stage}
        for name, parts in (("stage", [(i, s) for i, s, k in self.heldout if k == stage]),
                            ("all", [(i, s) for i, s, _ in self.heldout])):
            ids = np.concatenate([i for i, _ in parts]) if parts else np.zeros(0, np.int64)
            sig = np.concatenate([s for _, s in parts]) if parts else np.zeros(0)
            rec[f"n_{name}"] = len(ids)
            rec[f"spearman_{name}"] = spearman(np.asarray(score_ids(ids), dtype=np.float64), sig) if len(ids) else math.nan
        return rec

    def collect(self, ctx: Any, ids: np.ndarray, rng: np.random.Generator, lookahead_lr: float, step: int,
                stage: int) -> tuple[Probed | None, dict[str, Any]]:
        """No samples are probed at an update: the buffer already holds what the steps labelled."""
        return None, {"ok": True, "reason": "", "ref_loss_before": math.nan, "ref_loss_after": math.nan,
                      "hypergrad_norm": math.nan, "hypergrad_std": math.nan, "lookahead_lr": lookahead_lr,
                      "fd_eps": math.nan, "v_norm": math.nan}

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {"M": None if self.M is None else {k: v.detach().cpu().clone() for k, v in self.M.items()},
                "heldout": [(i.copy(), s.copy(), k) for i, s, k in self.heldout]}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if state.get("M") is not None:
            self.M = {k: v.to(device) for k, v in state["M"].items()}
            if self.ghost is not None:
                self.ghost.set_direction(self.M)
        self.heldout = [(np.asarray(i), np.asarray(s), int(k)) for i, s, k in state.get("heldout", [])]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's correlation (diagnostics' ranks and correlation); nan below 3 values or for a constant side."""
    return corr(rank(a), rank(b)) if len(a) >= 3 else math.nan
