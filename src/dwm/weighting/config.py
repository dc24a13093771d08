"""Configuration of the Data Weighting Model: its network, the bi-level update and the stage schedule.

Defaults and why (the paper's text is not available here; docs/METHOD.md has the derivations, docs/DECISIONS.md
the measurements behind each choice). The defaults are the settings validated on the shipped targets (cpu-small,
15 seeds: DWM below uniform in every seed, 79% / 55% of the uniform -> target-domain gap on novels / speech):
- 5 stages (the paper's number), one bi-level update at each stage start that probes 128 training samples; phi
  fits all stages' probed samples so far (buffer_stages 5) with 8 Adam steps under a KL(w || uniform) penalty of
  0.25, sees each sample's domain, and reads its first 128 tokens.
- apply "resample": phi's scores draw each batch from 4x as many streamed candidates at tau 0.25, trained at weight
  1. The paper's in-batch variant (w = B softmax(s / tau) inside the batch) is `apply = "weights"`.
- backend "fd": central finite differences of per-sample losses along u = P grad L_ref(theta'), two forward
  passes, no second-order graph, so it works with SDPA, torch.compile and DDP; "exact" is the reference. Every
  pass runs in micro-batches, so an update's memory is a training step's whatever the number of probed samples.
- lookahead lr = the LM's current learning rate and precondition "adam": the lookahead is exactly AdamW's next step
  (momentum, bias corrections, the current gradient in v_hat; docs/METHOD.md section 3), which is what the weights
  affect; an SGD lookahead mis-scales the step under Adam by orders of magnitude.
- fd_eps = 1e-2: the perturbation theta +/- eps*u has norm fd_eps * max(1, rms(theta)), i.e. DARTS' 0.01/||u|| for
  LLaMA-scale parameters. In float32 the error against "exact" is ~1/delta (loss rounding) below and ~delta^2
  (truncation) above; the measured optimum is delta ~ 0.01-0.03 with < 1% error at the default (METHOD.md, sec. 4).
  The perturbed forwards run in float32 without autocast; bf16/fp16 parameters are refused by "fd".
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from dwm.config import check_positive, check_range
from dwm.errors import UserError


@dataclass
class WeightingNetConfig:
    """The scoring network f_phi(x) -> s."""

    layers: int = 2
    """transformer encoder layers"""
    width: int = 128
    """hidden width"""
    heads: int = 4
    """attention heads"""
    max_len: int = 128
    """score only the first max_len tokens of a sample: scoring 4 candidates a trained sample costs ~15% of a
    cpu-small step at 128 (64 lost quality on the reference side)"""
    init_from_lm_embedding: bool = False
    """initialise the token embedding from the LM's (projected to `width` when sizes differ); only for an LM
    loaded with trained weights (model.init = pretrained): refused for an LM trained from scratch, whose embedding is
    random at step 0"""
    batch_context: bool = False
    """self-attention across the batch's pooled vectors, so a sample's weight can depend on the rest of the batch"""
    use_loss_feature: bool = False
    """feed the LM's current per-sample loss (needs one extra no-grad LM forward per batch)"""
    use_domain_feature: bool = True
    """feed a learned embedding of the sample's domain id, so phi can hold a per-domain preference directly"""
    dropout: float = 0.0
    """dropout inside the encoder"""

    def validate(self, prefix: str) -> None:
        for k in ("layers", "width", "heads", "max_len"):
            check_positive(f"{prefix}{k}", getattr(self, k))
        if self.width % self.heads:
            raise UserError(f"{prefix}width ({self.width}) must be divisible by {prefix}heads ({self.heads})")
        check_range(f"{prefix}dropout", self.dropout, 0, 1, hi_open=True)


@dataclass
class WeightingAdvancedConfig:
    """[weighting.advanced]: the research levers of the bi-level update, phi's optimisation, the schedule's cost
    levers and the diagnostics. The defaults are the validated settings; docs/DECISIONS.md has the measurements."""

    ref_loss: Literal["passage", "target"] = "passage"
    """outer loss on reference passages: 'passage' (mean NLL of every token) or 'target' (NLL of the last word)"""
    batch_size: int = 128
    """training samples probed per bi-level update (global): the lookahead steps on the first min(G, batch_size)
    weighted by phi, and every probed sample gets its dL/dw (the rest at two no-grad forwards each); 0 = G. Memory
    does not grow with it (every pass runs in micro-batches); 64 let phi follow a noisy draw on some seeds"""
    normalize: Literal["std", "none"] = "std"
    """scale of dL/dw before it reaches phi: 'std' divides by its spread over the probed samples, so phi's step
    size and the kl weight do not depend on the hypergradient's magnitude (which shrinks with the lr)"""
    kl: float = 0.25
    """lambda of the KL(w/B || uniform) penalty in phi's objective; its optimum is w ~ exp(-dL/dw / lambda); 0
    lets phi collapse onto a few samples (0.5 and 1 recovered less of the gap)"""
    phi_steps: int = 8
    """phi optimizer steps per bi-level update, each on a batch of G samples drawn from the buffer of probed
    samples (1 step barely moved the weights)"""
    buffer_stages: int = 5
    """phi's buffer keeps the probed samples of the last this many stages (5 = all so far: evidence accumulates
    and one noisy draw cannot undo it; 1 = the current stage only)"""
    probe_len: int = 0
    """hypergradients of each probed sample's first probe_len tokens only (0 = all): halves the probe cost at
    half length, and phi reads only its first net.max_len tokens anyway"""
    diagnostics: bool = False
    """at every stage start, measure how much of a fresh hypergradient phi captures and how noisy it is (held-back
    samples, two reference batches; logged as 'diagnose' events; costs two extra probes per stage)"""
    diagnostics_size: int = 64
    """held-back training samples of the diagnostics"""
    ref_batch_size: int = 16
    """reference passages per bi-level update"""
    fd_eps: float = 1e-2
    """finite-difference step: the perturbation eps*v has norm fd_eps * max(1, ||theta||/sqrt(n)) (see METHOD.md)"""
    precondition: Literal["adam", "sgd"] = "adam"
    """the lookahead: 'adam' (AdamW's real next step, see METHOD.md section 3) or 'sgd' (theta - eta g)"""
    lookahead_lr: float = 0.0
    """eta of the lookahead; 0 = the LM's current learning rate"""
    uniform_stages: int = 0
    """the first this many stages take no bi-level update and train with phi's initial scores (all 0: exactly
    uniform): one update fewer per stage, a cost lever; 1 lost a fifth of speech's gain (docs/DECISIONS.md)"""
    frozen_stages: int = 0
    """the last this many stages take no bi-level update and keep phi as the stage before left it: fewer updates,
    a cost lever; 2 reached ~1.2x and missed half the novels gap by 0.3 points on fresh seeds (docs/DECISIONS.md)"""
    updates_per_stage: int = 1
    """M, bi-level updates at each stage start (the paper's structure: one per stage boundary); 0 = auto:
    max(1, round(update_fraction * steps per stage))"""
    update_fraction: float = 0.04
    """with updates_per_stage=0, M as a fraction of the stage's LM steps"""
    lr: float = 1e-3
    """weighting model AdamW learning rate"""
    weight_decay: float = 0.01
    """weighting model AdamW weight decay"""
    grad_clip: float = 1.0
    """clip of the weighting model's gradient norm"""
    draw: Literal["gumbel", "systematic"] = "gumbel"
    """apply = resample: how a batch is drawn from the candidates. 'gumbel' (the measured default): G distinct
    candidates by Gumbel top-k, inclusion probabilities capped at 1, so the trained mixture is flatter than w.
    'systematic': expected counts G * p_i exactly (a candidate whose weight asks for two copies gets them), and the
    lookahead models that expected step (w over the whole candidate chunk). Not yet measured against 'gumbel'"""
    ref_every: int = 10
    """backend ghost: LM steps between refreshes of the reference direction P grad L_ref (one reference forward +
    backward each)"""
    holdout: float = 0.1
    """backend ghost: share of the labelled samples held back from phi's fit, to report how well phi predicts them"""
    probe_lm_loss: bool = True
    """also record the LM's per-sample loss on the probe set at each stage (dwm analyze correlates weights with it);
    it is a no-grad LM forward of probe_size samples per stage, most of the probe pass's cost; training is the same
    either way"""
    min_ess_fraction: float = 0.1
    """warn when effective sample size / B falls below this"""

    def validate(self, prefix: str) -> None:
        for k in ("fd_eps", "lr"):
            check_positive(f"{prefix}{k}", getattr(self, k))
        check_positive(f"{prefix}grad_clip", self.grad_clip, allow_zero=True)
        check_range(f"{prefix}update_fraction", self.update_fraction, 0, 1, lo_open=True)
        check_range(f"{prefix}min_ess_fraction", self.min_ess_fraction, 0, 1)
        check_positive(f"{prefix}ref_batch_size", self.ref_batch_size)
        check_positive(f"{prefix}ref_every", self.ref_every)
        check_range(f"{prefix}holdout", self.holdout, 0, 1, hi_open=True)
        for k in ("updates_per_stage", "lookahead_lr", "weight_decay", "batch_size", "kl", "probe_len",
                  "uniform_stages", "frozen_stages"):
            check_positive(f"{prefix}{k}", getattr(self, k), allow_zero=True)
        for k in ("phi_steps", "buffer_stages", "diagnostics_size"):
            check_positive(f"{prefix}{k}", getattr(self, k))


@dataclass
class WeightingConfig:
    """How the batch is weighted: uniform, a learned DWM, or a replayed DWM from another run."""

    mode: str = "uniform"
    """'uniform', 'dwm' (learn a weighting model by bi-level optimisation), 'domains' (hand-set per-domain weights,
    `domain_weights`), or a RUN_DIR whose stage models to replay"""
    domain_weights: str = ""
    """with mode = domains: raw weight per domain, e.g. "books=2,code=0.5" (unnamed domains 1), normalised within
    each batch to sum to its size: the in-batch counterpart of a static mixture (dwm.weighting.domains)"""
    keep_learning: bool = False
    """with mode=RUN_DIR: keep updating the replayed model by bi-level updates"""
    net: WeightingNetConfig = field(default_factory=WeightingNetConfig)
    apply: Literal["weights", "resample"] = "resample"
    """how the scores act on training: 'resample' (default; each batch is drawn from the next `candidates` x B
    samples of the data stream with probability softmax(s / tau) mixed with the floor, without replacement
    (Gumbel top-k), and trained at weight 1: no loss of effective batch size; the stream must hold `candidates` x
    the token budget) or 'weights' (the paper's in-batch variant: w = B softmax(s / tau) within each batch; at
    64-sample batches it recovered 16-19% of the uniform -> target-domain gap against resample's 55-79%,
    docs/DECISIONS.md)"""
    candidates: float = 4.0
    """with apply = resample: candidates scored per sample trained (8 gained on the reference side at 300 steps
    within noise, at +0.07x cost)"""
    temperature: float = 0.25
    """tau in w = B * softmax(s / tau); picked on the reference side from 0.5, 0.25, 0.125"""
    floor: float = 0.0
    """lambda in w = (1 - lambda) w + lambda: mixes in uniform weighting"""
    reference: str = "data/target/reference.jsonl"
    """LAMBADA-format JSONL the weighting model optimises against (never the heldout split)"""
    backend: Literal["fd", "exact", "ghost"] = "fd"
    """where phi's evidence comes from: 'fd' (default: the lookahead hypergradient of `advanced.batch_size` probed
    samples at each update, by finite differences), 'exact' (the same by double backward, math attention), or
    'ghost' (every sample the LM trains on, labelled in its own backward with < P grad L_ref(theta), grad l_i >:
    thousands a stage instead of 128 an update; docs/METHOD.md section 12)"""
    schedule: Literal["staged", "interleaved"] = "staged"
    """'staged': K stages, M updates at each stage start then frozen; 'interleaved': one update every `interval` steps"""
    stages: int = 5
    """K, number of stages (the paper's 5)"""
    interval: int = 25
    """interleaved schedule: LM steps between weighting-model updates"""
    probe_size: int = 2000
    """training samples (stratified by domain, fixed) scored at every stage boundary for dwm analyze"""
    advanced: WeightingAdvancedConfig = field(default_factory=WeightingAdvancedConfig)
    """the research levers (a sub-section: [weighting.advanced])"""
    # every [weighting.advanced] key was a [weighting] key before the sub-section: the old names are still read,
    # with a one-line warning (dwm.config)
    MOVED = MappingProxyType({f.name: f"advanced.{f.name}" for f in fields(WeightingAdvancedConfig)})

    def validate(self, prefix: str) -> None:
        """Ranges and cross-field rules; `mode` itself (a registered weighter or a run directory) is resolved
        where the weighters are wired (dwm.run)."""
        if self.mode == "domains" and not self.domain_weights.strip():
            raise UserError(f"{prefix}mode = domains needs {prefix}domain_weights, e.g. \"books=2\"")
        if self.keep_learning and self.mode in ("uniform", "dwm", "domains"):
            raise UserError(f"{prefix}keep_learning needs {prefix}mode = a RUN_DIR whose weighting model to replay")
        check_positive(f"{prefix}temperature", self.temperature)
        check_range(f"{prefix}floor", self.floor, 0, 1)
        if self.candidates < 1:
            raise UserError(f"config key {prefix}candidates: must be >= 1, got {self.candidates}")
        for k in ("stages", "interval"):
            check_positive(f"{prefix}{k}", getattr(self, k))
        check_positive(f"{prefix}probe_size", self.probe_size, allow_zero=True)
        adv, ap = self.advanced, f"{prefix}advanced."
        if adv.uniform_stages + adv.frozen_stages >= self.stages:
            raise UserError(f"config keys {ap}uniform_stages + {ap}frozen_stages: must be below "
                            f"{prefix}stages ({self.stages}), got {adv.uniform_stages} + {adv.frozen_stages}: "
                            "phi would never learn")

    def check_paths(self, prefix: str = "weighting.") -> None:
        """The files a learning run reads (called with the data-dependent checks, not on every load)."""
        if (self.mode == "dwm" or self.keep_learning) and not Path(self.reference).is_file():
            raise UserError(f"config key {prefix}reference: {self.reference} does not exist (`dwm target build`)")
