"""dwm: learned, dynamic data weighting for LLM pretraining.

Pipeline, one sub-package per stage:
    dwm.data       corpus building, LAMBADA-style target, `dwm prepare` (tokenize -> memmap + parquet)
    dwm.train      model presets, Trainer (bookkeeping) + swappable weighted step, checkpoints, DDP
    dwm.weighting  the Data Weighting Model, bi-level hypergradients (exact / finite-difference), stage schedule
    dwm.eval       held-out loss, LAMBADA accuracy/perplexity, lm-evaluation-harness, HF export

The library, one function per `dwm` command (each the function that command runs; imported on first use, so
`import dwm` stays cheap):

    info = dwm.prepare(["data/corpus"], "runs/data", vocab_size=8192, seq_len=256)     -> PreparedInfo
    sel = dwm.select(info, "dsir", 1_000_000, "runs/dsir.parquet", seed=0)             -> Selection
    res = dwm.train("cpu-small-dwm", overrides={"data.dir": info, "data.selection": sel,
                                                "out": "runs/dwm", "train.max_steps": 150})  -> TrainResult
    ev = dwm.evaluate(res.run_dir, target="data/target/heldout.jsonl")                  -> EvalResult
    summary = dwm.analyze([res.run_dir])                                                -> Summary

`dwm.train` is also the training package (`dwm.train.trainer`, ...): calling it calls `dwm.run.train`, which
type checkers see under that name. Every bad input raises `dwm.UserError` (one line, no traceback).
"""

import sys

# only builtins at import time (no typing, importlib, types): `import dwm` costs well under a millisecond
TYPE_CHECKING = False

__version__ = "0.1.0"

# public name -> "module:attribute", imported on first use
_LAZY = {
    "prepare": "dwm.data.prepare:prepare_data",
    "select": "dwm.selection.cli:select_documents",
    "evaluate": "dwm.eval.cli:evaluate",
    "analyze": "dwm.analysis.cli:analyze_runs",
    "PreparedInfo": "dwm.data.prepare:PreparedInfo",
    "Selection": "dwm.selection.cli:Selection",
    "RunConfig": "dwm.run:RunConfig",
    "TrainResult": "dwm.run:TrainResult",
    "load_config": "dwm.run:load_config",
    "EvalResult": "dwm.eval.cli:EvalResult",
    "Summary": "dwm.analysis.cli:Summary",
    "UserError": "dwm.errors:UserError",
}
__all__ = [
    "EvalResult",
    "PreparedInfo",
    "RunConfig",
    "Selection",
    "Summary",
    "TrainResult",
    "UserError",
    "analyze",
    "evaluate",
    "load_config",
    "prepare",
    "select",
    "train",
]

if TYPE_CHECKING:
    from typing import Any

    from dwm.analysis.cli import Summary
    from dwm.analysis.cli import analyze_runs as analyze
    from dwm.data.prepare import PreparedInfo
    from dwm.data.prepare import prepare_data as prepare
    from dwm.errors import UserError
    from dwm.eval.cli import EvalResult, evaluate
    from dwm.run import RunConfig, TrainResult, load_config
    from dwm.selection.cli import Selection
    from dwm.selection.cli import select_documents as select


def __getattr__(name: str) -> "Any":
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'dwm' has no attribute {name!r}")
    from importlib import import_module

    module, _, attr = target.partition(":")
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> "list[str]":
    return sorted({*globals(), *_LAZY})


class _TrainPackage(type(sys)):  # a ModuleType subclass
    """The `dwm.train` package, callable: `dwm.train(config, *, overrides=(), resume=False, callbacks=())` is
    `dwm.run.train` (see its docstring)."""

    def __call__(self, config=None, *, overrides=(), resume: bool = False, callbacks=()):
        from dwm.run import train

        return train(config, overrides=overrides, resume=resume, callbacks=callbacks)


# the package's __init__ is only its docstring: importing it here costs nothing, and the same module object is
# what `import dwm.train.trainer` finds later, so `dwm.train` stays callable whatever is imported after
from dwm import train as _train_package

_train_package.__class__ = _TrainPackage
