"""`random`: documents drawn uniformly without replacement (seeded) until the token budget is met."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dwm.selection.method import SelectionMethod
from dwm.selection.pool import Pool


def score(pool: Pool, seed: int) -> dict[str, Any]:
    """A seeded uniform key per document: the selection is the first documents of a random permutation."""
    return {"scores": np.random.default_rng([seed, 0xA11]).random(len(pool)), "settings": {}}


class RandomMethod(SelectionMethod):
    """`--method random`."""

    name = "random"

    def run(self, pool: Pool, target: Path, engine: Any) -> tuple[dict[str, Any], np.ndarray]:
        res = score(pool, self.args.seed)
        return res, res["scores"]
