"""`weighting.mode = "domains"`: hand-set per-domain weights within each batch (the benchmark's in-batch oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dwm.data.batch import Batch
from dwm.data.dataset import PreparedData
from dwm.errors import UserError
from dwm.run import build_trainer, validate
from dwm.weighting.config import WeightingConfig
from dwm.weighting.domains import DomainWeighter, parse_domain_weights


def test_parse_domain_weights():
    np.testing.assert_array_equal(parse_domain_weights("books=2, code=0.5", ["books", "code", "wiki"]), [2, 0.5, 1])
    with pytest.raises(UserError, match=r"unknown domain 'bokos' \(did you mean books\?\)"):
        parse_domain_weights("bokos=2", ["books", "code"])
    with pytest.raises(UserError, match="the weight of code must be > 0, got 0.0"):
        parse_domain_weights("code=0", ["books", "code"])
    with pytest.raises(UserError, match="expected domain=weight pairs"):
        parse_domain_weights(" , ", ["books"])
    with pytest.raises(UserError, match=r"expected domain=weight pairs \(e.g. books=2\), got 'books=two'"):
        parse_domain_weights("books=two", ["books"])


class _Ctx:
    def __init__(self, domains):
        self.data = type("D", (), {"domains": domains})()
        self.records = []

    def log(self, rec):
        self.records.append(rec)


def test_weights_are_normalised_within_the_batch():
    w = DomainWeighter(WeightingConfig(mode="domains", domain_weights="a=2"))
    ctx = _Ctx(["a", "b", "c"])
    w.attach(ctx)
    batch = Batch(torch.zeros(4, 3, dtype=torch.long), torch.full((4,), 3), torch.arange(4),
                  torch.tensor([0, 0, 1, 2]))
    # raw 2, 2, 1, 1 (sum 6) scaled to sum to the batch size 4
    torch.testing.assert_close(w.weights(batch), torch.tensor([4 / 3, 4 / 3, 2 / 3, 2 / 3]))
    assert ctx.records == [{"event": "domain_weights", "a": 2.0, "b": 1.0, "c": 1.0}]
    only_b = Batch(torch.zeros(2, 3, dtype=torch.long), torch.full((2,), 3), torch.arange(2), torch.tensor([1, 1]))
    torch.testing.assert_close(w.weights(only_b), torch.ones(2))  # one domain in the batch: uniform


def test_domains_mode_needs_weights(make_cfg):
    with pytest.raises(UserError, match="weighting.mode = domains needs weighting.domain_weights"):
        validate(make_cfg("weighting.mode=domains"), check_paths=False)


def test_domain_weights_train_and_equal_weights_are_uniform(make_cfg, prepared_dir, tmp_path):
    """A run with domain weights trains with them (logged, and a different model than uniform); weighting every
    domain the same is exactly uniform training."""
    domains = PreparedData(prepared_dir, "train").domains
    runs = {}
    for name, ov in {"uniform": [], "equal": ["weighting.mode=domains", f"weighting.domain_weights={domains[0]}=1"],
                     "skewed": ["weighting.mode=domains", f"weighting.domain_weights={domains[0]}=3"]}.items():
        tr = build_trainer(make_cfg(*ov, out=tmp_path / name))
        tr.train()
        runs[name] = [p.detach().clone() for p in tr.model.parameters()]
    for a, b in zip(runs["uniform"], runs["equal"], strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(runs["uniform"], runs["skewed"], strict=True))
    recs = [json.loads(x) for x in (Path(tmp_path / "skewed") / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "domain_weights", domains[0]: 3.0, domains[1]: 1.0} in [
        {k: v for k, v in r.items() if k != "step"} for r in recs]
    assert any(r.get("w_max", 1) > 1 for r in recs)
