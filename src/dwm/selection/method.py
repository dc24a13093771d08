"""The one interface of `dwm select`'s methods and their registry (like the trainer's weighters and selectors).

A method is a class registered in `METHODS` under its `--method` name (the built-ins lazily, "module:Class", in
dwm/selection/__init__.py; other packages add theirs with `METHODS.register`). It is built from the parsed
command line and `run` returns (result, keys): result = {"scores": per document, "settings": what to record in the
manifest, optionally "eligible": a mask}, keys = what the budget is filled by (highest first; Gumbel keys for
sampling methods).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from dwm.registry import Registry
from dwm.selection.pool import Pool

METHODS = Registry("selection method", "--method")


class SelectionMethod:
    name = "method"

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def run(self, pool: Pool, target: Path, engine: Any) -> tuple[dict[str, Any], np.ndarray]:
        raise NotImplementedError

