# ruff: noqa: F811  (the `data` fixture is imported from test_dwm and requested by name)
"""weighting.backend = ghost inside a run: every trained sample labelled, phi fitted at the stage boundaries,
held-back samples reported, exact resume."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from test_dwm import IN_BATCH, STEPS, _cli, assert_same_models, data, events, overrides  # noqa: F401 (fixture)

from dwm.errors import UserError
from dwm.run import build_trainer, load_config

GHOST = ("weighting.mode=dwm", "weighting.backend=ghost", "weighting.advanced.ref_every=2",
         "weighting.advanced.holdout=0.25")


def _run(data, out, *extra):
    t = build_trainer(load_config(None, overrides(data, out, *GHOST, *extra)))
    t.train()
    return t


def test_ghost_labels_every_trained_sample_and_phi_learns_at_the_boundaries(data, tmp_path):
    """G = 8 samples a step over 20 steps in 5 stages: the buffer holds the trained samples (less the held-back
    share) of every step before each boundary, phi moves, and each boundary after the first reports the held-back
    Spearman."""
    run = tmp_path / "ghost"
    t = _run(data, run, "weighting.advanced.buffer_stages=5")
    bilevel = events(run, "bilevel")
    assert [e["step"] for e in bilevel] == [0, 4, 8, 12, 16]
    assert bilevel[0]["buffer"] == 0  # nothing labelled before the first step
    buf = t.weighter.learner.buffer
    assert [b.step for b in buf] == list(range(STEPS))  # the last step harvested by the final checkpoint
    held = t.weighter.ghost.heldout
    for b in buf:
        assert len(b.ids) <= 8 and b.spread > 0 and np.all(np.isfinite(b.dL_dw))
    n_held = sum(len(i) for i, _, _ in held)
    assert sum(len(b.ids) for b in buf) + n_held == 8 * STEPS
    assert 0 < n_held < 8 * STEPS
    reports = events(run, "ghost_holdout")
    assert [r["stage"] for r in reports] == [0, 1, 2, 3] and all(r["n_all"] > 0 for r in reports)
    s0, s4 = (load_file(str(run / "weighting" / f"stage_{k}.safetensors")) for k in (0, 4))
    assert any(not torch.equal(s0[k], s4[k]) for k in s0)
    sig = pq.read_table(run / "signal" / "stage_1.parquet").to_pydict()
    assert sorted(set(sig["step"])) == [4, 5, 6, 7]


def test_ghost_record_is_the_hand_computed_product(data, tmp_path):
    """One step's record: dL/dw_i = -(lr/G) < M, grad l_i > with M the stored direction, each sample's gradient
    by its own backward (the same step, the same weights)."""
    from dwm.train.losses import per_sample_nll

    run = tmp_path / "one"
    t = build_trainer(load_config(None, overrides(data, run, *GHOST, "train.max_steps=2",
                                                  "weighting.advanced.holdout=0")))
    w = t.weighter
    t.weighter.before_step(t.ctx, 0)
    batch = t.local_batch(0)
    M = {k: v.clone() for k, v in w.ghost.M.items()}
    model = t.model
    w.ghost.ghost.stop()  # the hand computation's own backward passes are not the step's
    names = [k for k, _ in model.named_parameters()]
    want = []
    for i in range(len(batch)):
        l = per_sample_nll(model(input_ids=batch.input_ids[i:i + 1]).logits, batch.input_ids[i:i + 1],
                           batch.n_tokens[i:i + 1]).sum()
        g = torch.autograd.grad(l, list(model.parameters()))
        want.append(sum(float((gi * M[k]).sum()) for k, gi in zip(names, g)))
    lr = w.ghost.pending["lr"]
    w.ghost.ghost.start()
    t.train_step(batch)
    rec = w.ghost.harvest()
    np.testing.assert_allclose(rec.dL_dw, -(lr / len(batch)) * np.array(want), rtol=1e-4, atol=1e-12)
    assert list(rec.ids) == list(batch.sample_ids.numpy())


@pytest.mark.slow
def test_ghost_kill_and_resume_is_exact(data, tmp_path):
    """Killed after step 11 (checkpoint at 10): M, the buffer, the held-back samples and the step in flight come
    back, so phi's stage models and the LM match an uninterrupted run."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    common = [*GHOST, "weighting.apply=resample", "weighting.advanced.phi_steps=2"]
    assert _cli(overrides(data, full, *common)).returncode == 0
    assert _cli(overrides(data, killed, *common), kill_after=11).returncode != 0
    r = _cli(["--resume", *overrides(data, killed, *common)])
    assert r.returncode == 0, r.stderr
    assert_same_models(full, killed, atol=1e-6)
    ra, rb = (events(r, "ghost_holdout") for r in (full, killed))
    assert [x["n_all"] for x in ra] == [x["n_all"] for x in rb]


def test_ghost_refuses_compile(data, tmp_path):
    with pytest.raises(UserError, match="torch.compile"):
        build_trainer(load_config(None, overrides(data, tmp_path / "c", *GHOST, "train.compile=true")))


@pytest.mark.slow
def test_replay_draws_the_batches_the_learner_drew(data, tmp_path):
    """A learner that resampled with candidates 2, tau 0.5 and systematic draws; its replay under a config with
    the defaults (candidates 4, tau 0.25, gumbel) adopts the source's settings and trains on the same batches."""
    src, rep = tmp_path / "src", tmp_path / "rep"
    learn = ("weighting.mode=dwm", "weighting.apply=resample", "weighting.candidates=2", "weighting.temperature=0.5",
             "weighting.advanced.draw=systematic", "weighting.advanced.phi_steps=2")

    def run(out, *extra):
        t = build_trainer(load_config(None, overrides(data, out, *extra)))
        seen, orig = [], t.selector.batch_ids
        t.selector.batch_ids = lambda ctx, step: seen.append(orig(ctx, step)) or seen[-1]
        t.train()
        return t, seen

    _, a = run(src, *learn)
    t, b = run(rep, f"weighting.mode={src}", "weighting.apply=resample")
    assert t.weighter.cfg.candidates == 2 and t.weighter.cfg.advanced.draw == "systematic"
    assert t.weighter.scorer.temperature == 0.5
    assert len(a) == len(b) == STEPS and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(len(set(x.tolist())) < len(x) for x in a)  # systematic draws repeat where phi asks for it


def test_resample_on_a_small_selection_warns_once_before_step_0(data, tmp_path, caplog):
    """20 steps x 8 samples x 4 candidates streamed from a pool of 96: 6.7 passes; the warning says what flat scores
    would leave unseen or repeat."""
    import logging

    with caplog.at_level(logging.WARNING):
        t = build_trainer(load_config(None, overrides(data, tmp_path / "w", "weighting.mode=dwm",
                                                      "weighting.apply=resample")))
    lines = [r.getMessage() for r in caplog.records if "passes over them" in r.getMessage()]
    assert len(lines) == 1 and "6.7 passes" in lines[0] and t.step == 0


@pytest.mark.slow
def test_ghost_two_processes_equal_one(data, tmp_path, free_port):
    """Each rank scores its own rows in its backward, the records are gathered in rank order, M is the mean over
    the ranks' reference shares: 2 gloo processes label the same samples with the same numbers and train the same
    LM and phi as 1 (float64; one phi step per update, see test_dwm's DDP test)."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*GHOST, "train.precision=fp64", "weighting.advanced.phi_steps=1", "weighting.advanced.buffer_stages=5"]
    assert _cli(overrides(data, one, *common)).returncode == 0
    r = _cli(overrides(data, two, *common), nproc=2, port=free_port())
    assert r.returncode == 0, r.stderr
    assert_same_models(one, two, atol=1e-8)
    ha, hb = events(one, "ghost_holdout"), events(two, "ghost_holdout")
    assert [x["n_all"] for x in ha] == [x["n_all"] for x in hb] and len(ha) == 4
    for k in range(4):
        ta, tb = (pq.read_table(r / "signal" / f"stage_{k}.parquet").to_pydict() for r in (one, two))
        assert ta["sample_id"] == tb["sample_id"]
        np.testing.assert_allclose(ta["dL_dw"], tb["dL_dw"], rtol=1e-7, atol=1e-14)
