"""benchmarks/bench_peers.py: each method's cell (recipe and overrides), and the ghost signal's analysis by domain
against a hand computation."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dwm.run import load_config, recipe_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_peers

    yield bench_peers
    sys.path.remove(str(REPO / "benchmarks"))


def test_every_method_is_a_valid_run(peers, tmp_path):
    t = peers.B.Target("novels", tmp_path / "data", tmp_path / "ref.jsonl", tmp_path / "held.jsonl", "books")
    modes = {}
    for m in peers.METHODS:
        cell = peers.method_cell(t, m, 10)
        cfg = load_config(recipe_path(cell.recipe), cell.overrides)
        modes[m] = (cell.arm, cfg.weighting.mode, cfg.selector.mode, cfg.weighting.backend)
    assert modes == {"uniform": ("uniform", "uniform", "sequential", "fd"),
                     "oracle": ("static:1.0", "uniform", "sequential", "fd"),
                     "influence": ("influence", "uniform", "influence", "fd"),
                     "doge": ("doge", "doge", "sequential", "fd"), "odm": ("odm", "odm", "sequential", "fd"),
                     "dwm": ("dwm", "dwm", "sequential", "fd"), "dwm-ghost": ("dwm-ghost", "dwm", "sequential", "ghost")}
    c = peers.method_cell(t, "doge", 10, steps=195)
    assert c.arm == "doge@195" and "train.max_steps=195" in c.overrides and f"doge.reference={t.reference}" in c.overrides


def test_signal_by_domain_by_hand(peers, tmp_path):
    """Domain a: ids 0, 1, 4 with signal 1, 3, 2; domain b: ids 2, 3, 5 with signal 5, 7, 6."""
    run = tmp_path / "run"
    (run / "signal").mkdir(parents=True)
    ids, dom, sig = [0, 1, 4, 2, 3, 5], ["a", "a", "a", "b", "b", "b"], [1.0, 3.0, 2.0, 5.0, 7.0, 6.0]
    pq.write_table(pa.table({"sample_id": ids, "domain": dom, "dL_dw": [-x for x in sig], "signal": sig,
                             "stage": [0] * 6, "step": [0] * 6}), run / "signal" / "stage_0.parquet")
    (run / "metrics.jsonl").write_text(json.dumps({"event": "ghost_holdout", "stage": 0, "spearman_stage": 0.5}) + "\n")
    [row] = peers.signal_by_domain(run)
    # domain means 2 and 6; total sum of squares about the mean 4: 9+1+4+1+9+4 = 28, residual 1+1+0+1+1+0 = 4
    assert row["r2"] == pytest.approx(1 - 4 / 28)
    # fitted on the even ids (a: 1 and 2 -> 1.5; b: 5), tested on the odd ones (a: 3; b: 7, 6): predictions 1.5, 5, 5
    # have ranks 0, 1.5, 1.5 against the signal's 0, 2, 1: correlation 1.5 / sqrt(1.5 * 2)
    assert row["domain_spearman"] == pytest.approx(1.5 / math.sqrt(3.0))
    assert row["n"] == 6 and row["stage"] == 0 and row["phi_spearman"] == 0.5
