"""dwm: learned, dynamic data weighting for LLM pretraining.

Pipeline, one sub-package per stage:
    dwm.data       corpus building, LAMBADA-style target, `dwm prepare` (tokenize -> memmap + parquet)
    dwm.train      model presets, Trainer (bookkeeping) + swappable weighted step, checkpoints, DDP
    dwm.weighting  the Data Weighting Model, bi-level hypergradients (exact / finite-difference), stage schedule
    dwm.eval       held-out loss, LAMBADA accuracy/perplexity, lm-evaluation-harness, HF export
"""

__version__ = "0.1.0"
__all__ = ["DWM"]


def __getattr__(name: str):
    """`dwm.DWM` (the Data Weighting Model in any training loop: docs/LIBRARY.md), imported on first use so that
    `import dwm` stays free of torch."""
    if name == "DWM":
        from dwm.weighting.loop import DWM

        return DWM
    raise AttributeError(f"module 'dwm' has no attribute {name!r}")
