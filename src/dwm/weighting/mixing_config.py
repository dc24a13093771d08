"""The `[doge]` and `[odm]` sections: the per-domain online mixtures that DWM is compared with
(dwm/weighting/mixing.py). Kept torch-free: `dwm.runconfig` composes them into every run config.

Both keep a distribution q over the domains and draw each batch from `candidates` x G streamed samples so that a
domain's expected share of the batch is q_d (renormalised over the domains present among the candidates), trained
at weight 1: the same streamed candidates, the same draw and the same weight-1 training as the DWM's default
`apply = "resample"`, so a comparison with it isolates one thing, a per-domain policy against phi's per-sample scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dwm.config import check_positive, check_range
from dwm.errors import UserError

Draw = Literal["gumbel", "systematic", "multinomial"]


@dataclass
class DoGEConfig:
    """weighting.mode = doge: DoGE-style exponentiated-gradient domain weights (Fan et al. 2023), driven by the DWM's
    own first-order hypergradient. After each LM step, every trained sample's < P grad L_ref, grad l_i > (read in
    that step's backward, as weighting.backend = ghost does) is averaged per domain and divided by its spread over
    the batch, g_d; then log q_d += lr * g_d. The original DoGE reweights a proxy model's loss by q and keeps the
    average q as a static mixture; here q draws the batches of the run itself, online."""

    reference: str = "data/target/reference.jsonl"
    """LAMBADA-format reference passages whose loss the mixture lowers (the DWM's weighting.reference)"""
    lr: float = 0.1
    """step of the exponentiated-gradient update on the standardised per-domain signal (chosen a priori, not tuned:
    a domain that is consistently one spread better than the rest gains 15 nats over 150 steps, enough to reach
    the draw's cap, while one step's noise moves q by ~10%)"""
    ref_every: int = 10
    """LM steps between refreshes of the reference direction P grad L_ref (as weighting.advanced.ref_every)"""
    ref_batch_size: int = 16
    """reference passages per refresh"""
    init: Literal["corpus", "uniform"] = "corpus"
    """the starting q: each domain's share of the training pool (the first steps train as uniform does), or 1/K
    (DoGE's own start)"""
    candidates: float = 4.0
    """streamed samples per trained sample: a domain can reach at most this times its stream share by the
    gumbel draw (as weighting.candidates)"""
    draw: Draw = "gumbel"
    """how G samples are drawn from the candidates (dwm.nn.sampling.draw; as weighting.advanced.draw)"""

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}lr", self.lr)
        check_positive(f"{prefix}ref_every", self.ref_every)
        check_positive(f"{prefix}ref_batch_size", self.ref_batch_size)
        if self.candidates < 1:
            raise UserError(f"config key {prefix}candidates: must be >= 1, got {self.candidates}")

    def check_paths(self, prefix: str = "doge.") -> None:
        if not Path(self.reference).is_file():
            raise UserError(f"config key {prefix}reference: {self.reference} does not exist (`dwm target build`)")


@dataclass
class ODMConfig:
    """weighting.mode = odm: Online Data Mixing (Albalak et al. 2023), EXP3 over the domains with the training loss as
    reward. Before step t (1-based), eps_t = min(1/K, sqrt(ln K / (K t))) and
    q = (1 - K eps_t) softmax(eps_{t-1} R) + eps_t; after it, each domain d present in the batch updates
    R_d = smoothing R_d + (1 - smoothing) mean loss_d / q_d (importance-weighted, as in ODM; ODM draws one domain per
    batch, here every domain of the batch is an observed arm). Blind to the target: it shows what a target-agnostic
    mixture does at the same compute."""

    smoothing: float = 0.9
    """moving-average factor of the reward estimates (ODM's alpha)"""
    candidates: float = 4.0
    """streamed samples per trained sample (as weighting.candidates)"""
    draw: Draw = "gumbel"
    """how G samples are drawn from the candidates (dwm.nn.sampling.draw)"""

    def validate(self, prefix: str) -> None:
        check_range(f"{prefix}smoothing", self.smoothing, 0, 1, hi_open=True)
        if self.candidates < 1:
            raise UserError(f"config key {prefix}candidates: must be >= 1, got {self.candidates}")
