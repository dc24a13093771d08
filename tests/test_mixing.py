# ruff: noqa: F811  (the `data` fixture is imported from test_dwm and requested by name)
"""The per-domain peers of DWM: the domain-mix draw, ODM's EXP3 and DoGE's exponentiated-gradient update, each against
a hand computation, and both in a run (resume, two processes)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_dwm import _cli, data, final_params, overrides  # noqa: F401 (fixture)

from dwm.data.batch import Batch
from dwm.errors import UserError
from dwm.run import build_trainer, load_config, validate
from dwm.weighting.mixing import DoGEWeighter, DomainMixSelector, DomainPolicy, ODMWeighter
from dwm.weighting.mixing_config import DoGEConfig, ODMConfig


class _Ctx:
    def __init__(self, domains, domain_ids=None):
        self.data = type("D", (), {"domains": domains, "domain_ids": domain_ids})()
        self.records = []

    def log(self, rec):
        self.records.append(rec)


def _batch(domain_ids):
    n = len(domain_ids)
    return Batch(torch.zeros(n, 3, dtype=torch.long), torch.full((n,), 3), torch.arange(n), torch.tensor(domain_ids))


def test_candidate_probabilities_by_hand():
    pol = DomainPolicy(3, 4.0, "systematic")
    pol.q = np.array([0.5, 0.3, 0.2])
    # domain 0: 2 candidates share 0.5; domain 1: one has 0.3; domain 2: three share 0.2
    np.testing.assert_allclose(pol.candidate_probs(np.array([0, 0, 1, 2, 2, 2])),
                               [0.25, 0.25, 0.3, 0.2 / 3, 0.2 / 3, 0.2 / 3])
    # domain 1 absent: its mass goes to the others in proportion (0.5 / 0.7 and 0.2 / 0.7)
    np.testing.assert_allclose(pol.candidate_probs(np.array([0, 2, 2])), [5 / 7, 1 / 7, 1 / 7])


def test_the_draw_realises_q():
    """16 candidates (8 / 4 / 4 by domain), 4 drawn systematically: each domain's mean count is 4 q_d, whereas
    the stream alone would give 2 / 1 / 1."""
    pol = DomainPolicy(3, 4.0, "systematic")
    pol.q = np.array([0.1, 0.3, 0.6])
    dom = np.array([0] * 8 + [1] * 4 + [2] * 4)
    sel = DomainMixSelector(scorer=pol)
    sel.rng = np.random.default_rng(0)
    ctx = _Ctx(["a", "b", "c"], dom)
    counts = np.zeros(3)
    for _ in range(4000):
        counts += np.bincount(dom[sel.keep(ctx, np.arange(16), np.zeros(16), 4)], minlength=3)
    np.testing.assert_allclose(counts / 4000, 4 * pol.q, atol=0.03)


def test_odm_exp3_by_hand():
    """K = 3. Step 0 (t = 1): eps = min(1/3, sqrt(ln 3 / 3)) = 1/3, so q is uniform. The batch's losses (domain 0:
    2 and 4, domain 1: 3) give R = 0.1 x mean / q = [0.9, 0.9, 0]. Step 9 (t = 10): eps = sqrt(ln 3 / 30) and
    q = (1 - 3 eps) softmax(R / 3) + eps."""
    w = ODMWeighter(ODMConfig())
    ctx = _Ctx(["a", "b", "c"])
    w.attach(ctx)
    w.before_step(ctx, 0)
    np.testing.assert_allclose(w.policy.q, [1 / 3] * 3)
    w.weights(_batch([0, 0, 1]), torch.tensor([2.0, 4.0, 3.0]))
    np.testing.assert_allclose(w.R, [0.9, 0.9, 0.0])
    w.before_step(ctx, 9)
    eps = math.sqrt(math.log(3) / 30)
    e = [math.exp(0.3), math.exp(0.3), 1.0]
    want = [(1 - 3 * eps) * x / sum(e) + eps for x in e]
    np.testing.assert_allclose(w.policy.q, want, rtol=1e-12)
    assert w.policy.q[0] > w.policy.q[2]  # the domain with the higher loss is drawn more
    assert w.step_metrics() == {"share/a": 2 / 3, "share/b": 1 / 3, "mix/a": 1 / 3, "mix/b": 1 / 3, "mix/c": 1 / 3}
    state = w.state_dict()
    w2 = ODMWeighter(ODMConfig())
    w2.attach(ctx)
    w2.load_state_dict(state)
    w.before_step(ctx, 10)
    w2.before_step(ctx, 10)
    np.testing.assert_array_equal(w2.policy.q, w.policy.q)


class _Ghost:
    """Stands in for GhostScores: returns fixed per-sample products (times the loss factor it is handed)."""

    def __init__(self, scores):
        self.scores = torch.tensor(scores, dtype=torch.float64)

    def stop(self):
        pass

    def collect(self, scale=None):
        return self.scores if scale is None else self.scores.clone()


def test_doge_update_by_hand():
    """Products 1, 3 (domain 0), 2 (domain 1), -2 (domain 2): spread = population std = sqrt(4.5 - 1); g = per-domain
    mean / spread = [2, 2, -2] / sqrt(3.5); log q += lr g; a domain absent from the batch keeps its log q."""
    w = DoGEWeighter(DoGEConfig(lr=0.1))
    w.domains, w.K, w.log_q = ["a", "b", "c", "d"], 4, np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    w.ghost = _Ghost([1.0, 3.0, 2.0, -2.0])
    w.pending = (torch.tensor([0, 0, 1, 2]), torch.full((4,), 0.25, dtype=torch.float64))
    before = w.log_q.copy()
    w._harvest()
    g = np.array([2, 2, -2, 0]) / math.sqrt(3.5)
    np.testing.assert_allclose(w.log_q - before, 0.1 * g, rtol=1e-12)
    q = np.array([0.4, 0.3, 0.2, 0.1]) * np.exp(0.1 * g)
    np.testing.assert_allclose(w.policy.q, q / q.sum(), rtol=1e-12)
    assert w.pending is None
    w._harvest()  # nothing armed: nothing changes
    np.testing.assert_allclose(w.log_q - before, 0.1 * g, rtol=1e-12)


MIX = ("train.precision=fp64", "doge.ref_every=2", "doge.ref_batch_size=4")


def _cfg(data, out, mode, *extra):
    return load_config(None, overrides(data, out, f"weighting.mode={mode}", f"doge.reference={data['ref']}", *MIX,
                                       *extra))


def test_doge_step_uses_the_hand_computed_per_domain_products(data, tmp_path):
    """One step: log q moves by lr x (per-domain mean of < M, grad l_i >) / spread, each sample's gradient by its
    own backward at the step's parameters, M the stored direction."""
    from dwm.train.losses import per_sample_nll

    t = build_trainer(_cfg(data, tmp_path / "one", "doge", "train.max_steps=2"))
    w = t.weighter
    q0 = w.policy.q.copy()
    np.testing.assert_allclose(q0, np.bincount(t.train_data.domain_ids, minlength=3) / len(t.train_data))
    w.before_step(t.ctx, 0)
    batch = t.local_batch(0)
    M = {k: v.clone() for k, v in w.M.items()}
    w.ghost.stop()
    names = [k for k, _ in t.model.named_parameters()]
    prods = []
    for i in range(len(batch)):
        l = per_sample_nll(t.model(input_ids=batch.input_ids[i:i + 1]).logits, batch.input_ids[i:i + 1],
                           batch.n_tokens[i:i + 1]).sum()
        g = torch.autograd.grad(l, list(t.model.parameters()))
        prods.append(sum(float((gi * M[k]).sum()) for k, gi in zip(names, g, strict=True)))
    w.ghost.start()
    log_q0 = w.log_q.copy()
    t.train_step(batch)
    w._harvest()
    prods, dom = np.array(prods), batch.domain_ids.numpy()
    want = np.array([prods[dom == d].mean() if (dom == d).any() else 0.0 for d in range(3)]) / prods.std()
    np.testing.assert_allclose(w.log_q - log_q0, 0.1 * want, rtol=1e-6, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["doge", "odm"])
def test_mixture_runs_draw_by_their_policy(data, tmp_path, mode, caplog):
    """20 steps: the batches are drawn by q (logged as mix/ and share/ every step), q moves, and each step trains
    G = 8 samples at weight 1; the stream of 4 x 8 x 20 candidates wraps the 96-sample pool, said before step 0."""
    import logging

    run = tmp_path / mode
    with caplog.at_level(logging.WARNING):
        t = build_trainer(_cfg(data, run, mode))
    assert any(r.getMessage().startswith("drawing by the domain mixture streams 4 x the budget from 96 samples: 6.7 "
                                         "passes") for r in caplog.records)
    assert type(t.selector).__name__ == "DomainMixSelector"
    t.train()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "loss" in r]
    assert len(logged) == 20 and all(abs(sum(v for k, v in r.items() if k.startswith("share/")) - 1) < 1e-9
                                     for r in logged)
    qs = np.array([[r[f"mix/{d}"] for d in ("a", "b", "c")] for r in logged])
    np.testing.assert_allclose(qs.sum(1), 1.0)
    assert np.abs(qs[-1] - qs[0]).max() > 1e-3
    assert [r for r in recs if r.get("event") == f"{mode}_attach"]


def test_mixture_config_errors(data, tmp_path):
    with pytest.raises(UserError, match="config key doge.lr: must be > 0"):
        validate(_cfg(data, tmp_path / "a", "doge", "doge.lr=0"), check_paths=False)
    with pytest.raises(UserError, match="config key odm.smoothing"):
        validate(_cfg(data, tmp_path / "a", "odm", "odm.smoothing=1"), check_paths=False)
    with pytest.raises(UserError, match="config key doge.reference: .*nope.jsonl does not exist"):
        validate(_cfg(data, tmp_path / "a", "doge", f"doge.reference={tmp_path / 'nope.jsonl'}"))
    with pytest.raises(UserError, match=r"config key doge.draw: 'gumble' is not one of .*\(did you mean gumbel\?\)"):
        validate(_cfg(data, tmp_path / "a", "doge", "doge.draw=gumble"), check_paths=False)


@pytest.mark.slow
def test_mixture_build_errors(data, tmp_path):
    with pytest.raises(UserError, match="the odm weighter draws its batches with the 'domain-mix' selector"):
        build_trainer(_cfg(data, tmp_path / "b", "odm", "selector.mode=influence",
                           f"influence.reference={data['ref']}"))
    with pytest.raises(UserError, match="torch.compile"):
        build_trainer(_cfg(data, tmp_path / "c", "doge", "train.compile=true"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["doge", "odm"])
def test_mixture_kill_and_resume_is_exact(data, tmp_path, mode):
    """Killed after step 11 (checkpoint at 10): q, its statistics, the reference direction and the draw's
    generator come back, so the LM matches an uninterrupted run exactly."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = lambda out: overrides(data, out, f"weighting.mode={mode}", f"doge.reference={data['ref']}", *MIX)
    assert _cli(args(full)).returncode == 0
    assert _cli(args(killed), kill_after=11).returncode != 0
    r = _cli(["--resume", *args(killed)])
    assert r.returncode == 0, r.stderr
    a, b = final_params(full), final_params(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["doge", "odm"])
def test_mixture_two_processes_equal_one(data, tmp_path, free_port, mode):
    """Per-domain sums are all-reduced and the draw is made on rank 0: 2 gloo processes train the LM 1 does."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = lambda out: overrides(data, out, f"weighting.mode={mode}", f"doge.reference={data['ref']}", *MIX)
    assert _cli(args(one)).returncode == 0
    r = _cli(args(two), nproc=2, port=free_port())
    assert r.returncode == 0, r.stderr
    a, b = final_params(one), final_params(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-8, rtol=0) for k in a)
