"""Moved to dwm.nn.losses (the layer eval, selection and weighting share); kept so older imports still work."""

from dwm.nn.losses import per_sample_nll, target_mask

__all__ = ["per_sample_nll", "target_mask"]
