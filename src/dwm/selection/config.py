"""The `[influence]` section of a `dwm train` run: options of the MATES-style online selector
(selector.mode = "influence", dwm/selection/influence.py). Kept import-light: `dwm.run` composes it into the run
config without importing torch-heavy selection code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dwm.config import check_positive, check_range
from dwm.errors import UserError


@dataclass
class InfluenceConfig:
    """selector.mode = influence: every selector.every steps, score the candidate pool by each sample's influence on
    the reference loss at the current model, and train on the best 1/selector.candidates (Gumbel top-k)."""

    reference: str = "data/target/reference.jsonl"
    """LAMBADA-format reference passages whose loss the selection lowers"""
    ref_batch: int = 16
    """reference passages per probe (drawn afresh each selection)"""
    probe: float = 0.25
    """share of each candidate pool whose influence is computed exactly (2 no-grad forwards each); the rest is
    predicted by the influence model. 1.0: probe every candidate, no model"""
    history: int = 4
    """probe rounds (most recent) the influence model is fitted on"""
    buckets: int = 1024
    """influence model: hashed token unigram + bigram features (plus the domain)"""
    ridge: float = 1.0
    """influence model: ridge penalty"""
    temperature: float = 1.0
    """Gumbel top-k on the standardised scores; 0 = deterministic top-k"""
    chunk: int = 0
    """samples per no-grad forward of a probe (0: train.micro_batch_size)"""

    def validate(self, prefix: str) -> None:
        for k in ("ref_batch", "history", "buckets"):
            check_positive(f"{prefix}{k}", getattr(self, k))
        check_range(f"{prefix}probe", self.probe, 0, 1, lo_open=True)
        check_positive(f"{prefix}ridge", self.ridge)
        check_positive(f"{prefix}temperature", self.temperature, allow_zero=True)
        check_positive(f"{prefix}chunk", self.chunk, allow_zero=True)

    def check_paths(self, prefix: str = "influence.") -> None:
        if not Path(self.reference).is_file():
            raise UserError(f"config key {prefix}reference: {self.reference} does not exist (`dwm target build`)")
