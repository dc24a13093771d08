"""Moved to dwm.nn.bilevel (the layer selection and weighting share); kept so older imports still work."""

from dwm.nn.bilevel import (
    AdamLookahead,
    HyperResult,
    adam_lookahead,
    adam_preconditioner,
    all_reduce_,
    hypergradient,
)

__all__ = ["AdamLookahead", "HyperResult", "adam_lookahead", "adam_preconditioner", "all_reduce_", "hypergradient"]
