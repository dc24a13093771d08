"""The Data Weighting Model inside the trainer: stages, stage files and probes, exact resume, transfer (replay),
DDP equality, guards, and that DWM with weights forced to 1 is exactly uniform training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from dwm.run import build_trainer, load_config
from dwm.testing import make_synthetic_prepared
from dwm.train.trainer import Trainer
from dwm.weighting.diagnostics import weight_stats
from dwm.weighting.outputs import probe_ids
from dwm.weighting.probe import probed_records

STEPS = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dwm")
    make_synthetic_prepared(root / "data", n_train=96, n_val=16, seq_len=32, vocab_size=300,
                            domains=("a", "b", "c"))
    from tokenizers import Tokenizer

    from dwm.data.dataset import PreparedData

    tok = Tokenizer.from_file(str(root / "data" / "tokenizer.json"))
    val = PreparedData(root / "data", "val")
    with open(root / "ref.jsonl", "w") as f:
        f.writelines(json.dumps({"text": tok.decode(val.tokens[i, : val.n_tokens[i]].tolist())[:160]}) + "\n" for i in range(12))
    return {"data": root / "data", "ref": root / "ref.jsonl", "root": root}


# The mechanics below are tested on the paper's in-batch variant with one phi step per update (every weight is in
# the metrics, phi moves measurably in one step); the library's validated defaults run in
# test_library_defaults_run_and_move_the_weights and in the demo's test.
IN_BATCH = ("weighting.apply=weights", "weighting.advanced.kl=0", "weighting.advanced.phi_steps=1", "weighting.advanced.buffer_stages=1",
            "weighting.temperature=1", "weighting.advanced.batch_size=0", "weighting.advanced.updates_per_stage=0",
            "weighting.net.use_domain_feature=false", "weighting.net.max_len=256")


def overrides(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [f"data.dir={data['data']}", f"out={out}", "model.spec=tiny", "train.global_batch_tokens=256",
            "train.micro_batch_size=4", f"train.max_steps={STEPS}", f"weighting.reference={data['ref']}",
            "weighting.net.width=32", "weighting.net.heads=2", "weighting.probe_size=30",
            "weighting.advanced.ref_batch_size=4", "weighting.advanced.lr=0.01", "log.progress=false", "log.every=1",
            "checkpoint.every=5", *IN_BATCH, *extra]


def test_library_defaults_run_and_move_the_weights(data, tmp_path):
    """The validated defaults (resample, 8 phi steps, KL 0.25, all stages' evidence, the domain input): one update
    at each of the 5 stage starts probing 128 samples (here all 96 of the pool), the batches drawn by phi, and
    phi's stage models move."""
    run = tmp_path / "defaults"
    base = [o for o in overrides(data, run) if o not in IN_BATCH and not o.startswith("weighting.advanced.lr=")]
    t = build_trainer(load_config(None, [*base, "weighting.mode=dwm"]))
    t.train()
    bilevel = events(run, "bilevel")
    assert [e["step"] for e in bilevel] == [0, 4, 8, 12, 16] and all(e["ok"] for e in bilevel)
    assert [e["buffer"] for e in bilevel] == [96, 192, 288, 384, 480]  # evidence accumulates over the stages
    s0 = load_file(str(run / "weighting" / "stage_0.safetensors"))
    s4 = load_file(str(run / "weighting" / "stage_4.safetensors"))
    assert any(not torch.equal(s0[k], s4[k]) for k in s0)
    shares = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("share/") for r in shares for k in r)


def train(data, out, *extra) -> Trainer:
    t = build_trainer(load_config(None, overrides(data, out, *extra)))
    t.train()
    return t


def events(run: Path, kind: str) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if r.get("event") == kind]


def final_params(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "LATEST").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model" / "model.safetensors"))


def assert_same_models(a: Path, b: Path, atol: float, stages: int = 5) -> None:
    """Two runs ended with the same LM (last checkpoint) and the same stage models of phi, to atol."""
    pa, pb = final_params(a), final_params(b)
    assert all(torch.allclose(pa[k], pb[k], atol=atol, rtol=0) for k in pa)
    for k in range(stages):
        sa = load_file(str(a / "weighting" / f"stage_{k}.safetensors"))
        sb = load_file(str(b / "weighting" / f"stage_{k}.safetensors"))
        assert all(torch.allclose(sa[n], sb[n], atol=atol, rtol=0) for n in sa)


def test_weight_stats_by_hand():
    w = torch.tensor([2.0, 1.0, 1.0, 0.0])
    s = weight_stats(w, torch.tensor([0, 0, 1, 1]), ["x", "y"])
    p = np.array([0.5, 0.25, 0.25])
    assert s["w_entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(4))
    assert s["w_ess"] == pytest.approx(16 / 6)
    assert (s["w_min"], s["w_max"]) == (0.0, 2.0)
    assert s["w_domain/x"] == pytest.approx(1.5) and s["w_domain/y"] == pytest.approx(0.5)


def test_probe_ids_stratified_and_fixed():
    dom = np.array([0] * 5 + [1] * 100 + [2] * 100)
    ids = probe_ids(dom, 65)
    assert len(ids) == 65 and len(set(ids)) == 65
    counts = np.bincount(dom[ids], minlength=3)
    assert counts[0] == 5 and abs(counts[1] - counts[2]) <= 1  # the small domain whole, the rest split evenly
    assert np.array_equal(ids, probe_ids(dom, 65))


@pytest.mark.slow
def test_dwm_run_stages_probes_and_metrics(data, tmp_path):
    run = tmp_path / "run"
    train(data, run, "weighting.mode=dwm", "weighting.advanced.updates_per_stage=2")
    for k in range(5):
        meta = json.loads((run / "weighting" / f"stage_{k}.json").read_text())
        assert meta["dwm"]["stage"] == k and meta["dwm"]["step"] == k * STEPS // 5
        probes = pq.read_table(run / "probes" / f"stage_{k}.parquet")
        assert probes.num_rows == 30 and set(probes["domain"].to_pylist()) == {"a", "b", "c"}
        assert float(np.sum(probes["weight"].to_numpy())) == pytest.approx(30, rel=1e-5)
    bilevel = events(run, "bilevel")
    assert len(bilevel) == 10 and all(e["ok"] for e in bilevel)  # 5 stages x 2 updates, at stage starts only
    assert sorted({e["step"] for e in bilevel}) == [0, 4, 8, 12, 16]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "w_ess" in r]
    assert len(steps) == STEPS
    for r in steps:
        assert 0 < r["w_ess"] <= 8 + 1e-6 and r["w_min"] <= 1 <= r["w_max"] and 0 < r["w_entropy"] <= 1 + 1e-9
    # phi moved: stage models differ and the weights are no longer all 1
    s0 = load_file(str(run / "weighting" / "stage_0.safetensors"))
    s4 = load_file(str(run / "weighting" / "stage_4.safetensors"))
    assert any(not torch.equal(s0[k], s4[k]) for k in s0)
    assert steps[-1]["w_max"] > steps[-1]["w_min"]


@pytest.mark.slow
def test_uniform_stages_train_uniformly_then_learn(data, tmp_path):
    """uniform_stages = 2: no bi-level update in stages 0-1 and the LM trains there exactly as uniform training
    does (phi's initial scores are all 0); the updates start at stage 2's first step."""
    uni, dwm = tmp_path / "uni", tmp_path / "dwm"
    keep = ("checkpoint.every=4", "checkpoint.keep_every=8")
    train(data, uni, *keep)
    train(data, dwm, "weighting.mode=dwm", "weighting.advanced.updates_per_stage=2", "weighting.advanced.uniform_stages=2",
          "weighting.advanced.batch_size=16", *keep)
    bilevel = events(dwm, "bilevel")
    assert [e["step"] for e in bilevel] == [8, 8, 12, 12, 16, 16] and all(e["ok"] for e in bilevel)
    assert [e["stage"] for e in bilevel] == [2, 2, 3, 3, 4, 4]
    s0 = load_file(str(dwm / "weighting" / "stage_0.safetensors"))
    s1 = load_file(str(dwm / "weighting" / "stage_1.safetensors"))
    s2 = load_file(str(dwm / "weighting" / "stage_2.safetensors"))
    assert all(torch.equal(s0[k], s1[k]) for k in s0) and any(not torch.equal(s0[k], s2[k]) for k in s0)
    steps = [r for r in (json.loads(x) for x in (dwm / "metrics.jsonl").read_text().splitlines()) if "w_ess" in r]
    assert all(r["w_min"] == r["w_max"] == 1.0 for r in steps if r["step"] < 8)
    assert steps[-1]["w_max"] > steps[-1]["w_min"]
    # the LM after the two uniform stages (step 8) is uniform training's step 8, bit for bit
    a, b = (load_file(str(r / "checkpoints" / "step_00000008" / "model" / "model.safetensors")) for r in (uni, dwm))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_frozen_stages_keep_phi(data, tmp_path):
    """frozen_stages = 2: updates in stages 0-2 only; the last two stages keep stage 2's phi."""
    run = tmp_path / "frozen"
    train(data, run, "weighting.mode=dwm", "weighting.advanced.updates_per_stage=2", "weighting.advanced.frozen_stages=2",
          "weighting.advanced.batch_size=16")
    assert [e["step"] for e in events(run, "bilevel")] == [0, 0, 4, 4, 8, 8]
    s = [load_file(str(run / "weighting" / f"stage_{k}.safetensors")) for k in range(5)]
    assert all(torch.equal(s[2][k], s[j][k]) for j in (3, 4) for k in s[2])
    assert any(not torch.equal(s[1][k], s[2][k]) for k in s[1])


@pytest.mark.slow
def test_interleaved_schedule_skips_uniform_and_frozen_stages(data, tmp_path):
    """The interleaved schedule obeys both: with 4-step stages and an update every 2 steps, stage 0 (uniform) and
    stage 4 (frozen) take none."""
    run = tmp_path / "inter"
    train(data, run, "weighting.mode=dwm", "weighting.schedule=interleaved", "weighting.interval=2",
          "weighting.advanced.uniform_stages=1", "weighting.advanced.frozen_stages=1", "weighting.advanced.batch_size=16")
    assert [e["step"] for e in events(run, "bilevel")] == [4, 6, 8, 10, 12, 14]


@pytest.mark.slow
def test_floor_one_is_exactly_uniform_training(data, tmp_path):
    """w = (1-1)*w + 1 == 1: the bi-level updates still run, and must leave the LM bit-identical to uniform."""
    uni = tmp_path / "uni"
    dwm = tmp_path / "dwm"
    train(data, uni)
    train(data, dwm, "weighting.mode=dwm", "weighting.floor=1.0", "weighting.advanced.updates_per_stage=2")
    assert len(events(dwm, "bilevel")) == 10
    a, b = final_params(uni), final_params(dwm)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cli(args: list[str], nproc: int = 1, kill_after: int | None = None,
         port: int | None = None) -> subprocess.CompletedProcess:
    """`dwm train ARGS` in a subprocess (torchrun with nproc > 1 on `port`); with kill_after, SIGKILLed right after
    that step by tests/kill_after.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_after is not None:
        cmd = [sys.executable, str(Path(__file__).with_name("kill_after.py")), str(kill_after), *args]
    elif nproc == 1:
        cmd = [sys.executable, "-m", "dwm.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               "-m", "dwm.cli", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_dwm_kill_and_resume_is_exact(data, tmp_path):
    """Killed mid-stage with interleaved updates and resampled batches: the stage's buffer of probed samples, the
    selector's generator and the weighter's all come back from the checkpoint."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    common = ["weighting.mode=dwm", "weighting.schedule=interleaved", "weighting.interval=2",
              "weighting.apply=resample", "weighting.advanced.batch_size=12", "weighting.advanced.phi_steps=2"]
    r = _cli(overrides(data, full, *common))
    assert r.returncode == 0, r.stderr
    r = _cli(overrides(data, killed, *common), kill_after=11)
    assert r.returncode != 0  # SIGKILLed mid-stage 2, after the step-10 checkpoint
    r = _cli(["--resume", *overrides(data, killed, *common)])
    assert r.returncode == 0, r.stderr
    assert_same_models(full, killed, atol=1e-6)
    for k in range(5):
        # the stage's probed samples come back too (signal/ is rewritten from the checkpointed state)
        ta, tb = (pq.read_table(r / "signal" / f"stage_{k}.parquet").to_pydict() for r in (full, killed))
        assert ta["sample_id"] == tb["sample_id"] and ta["step"] == tb["step"] and len(ta["step"]) >= 12
        assert np.allclose(ta["signal"], tb["signal"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_replay_matches_stages_by_fraction_without_updates(data, tmp_path):
    src = tmp_path / "src"
    train(data, src, "weighting.mode=dwm", "weighting.advanced.updates_per_stage=2")
    # a run twice as long (another length) replays stage k over the same fraction of its training
    rep = tmp_path / "rep"
    t = build_trainer(load_config(None, overrides(data, rep, f"weighting.mode={src}",
                                                  f"train.max_steps={2 * STEPS}")))
    seen = {}
    orig = t.weighter.before_step

    def spy(ctx, step):
        orig(ctx, step)
        seen[step] = {k: v.clone() for k, v in t.weighter.net.state_dict().items()}

    t.weighter.before_step = spy
    t.train()
    assert events(rep, "bilevel") == []
    for step in (0, 9, 10, 25, 39):
        k = step * 5 // (2 * STEPS)
        want = load_file(str(src / "weighting" / f"stage_{k}.safetensors"))
        assert all(torch.equal(seen[step][n], want[n]) for n in want), (step, k)
    # keep-learning: the replayed model is the start of more bi-level updates
    kl = tmp_path / "kl"
    train(data, kl, f"weighting.mode={src}", "weighting.keep_learning=true", "weighting.advanced.updates_per_stage=1")
    assert len(events(kl, "bilevel")) == 5


def test_non_finite_outer_loss_skips_update_and_continues(data, tmp_path):
    run = tmp_path / "nan"
    train(data, run, "weighting.mode=dwm", "weighting.advanced.updates_per_stage=1", "weighting.advanced.lookahead_lr=1e30")
    ev = events(run, "bilevel")
    assert len(ev) == 5 and not any(e["ok"] for e in ev) and ev[-1]["skipped"] == 5
    s0 = load_file(str(run / "weighting" / "stage_0.safetensors"))
    s4 = load_file(str(run / "weighting" / "stage_4.safetensors"))
    assert all(torch.equal(s0[k], s4[k]) for k in s0)  # no update was applied
    assert (run / "checkpoints" / "LATEST").is_file()


@pytest.mark.slow
def test_ddp_two_processes_equal_one(data, tmp_path, free_port):
    """Scores gathered -> softmax over the global batch -> phi gradients all-reduced: 2 gloo processes equal 1.
    In float64: in float32 the fd hypergradient's rounding (~1e-7) is magnified by phi's Adam while phi's gradients
    are still ~0 (zero-initialised head), which would hide a real bug behind a loose tolerance."""
    one, two = tmp_path / "one", tmp_path / "two"
    # one phi step per update: Adam's first steps on phi's near-zero gradients take the sign of 1e-17 rounding
    # noise, so with the default 8 steps two processes part by ~1e-4 although every sum agrees to rounding
    common = ["weighting.mode=dwm", "weighting.advanced.updates_per_stage=2", "train.max_steps=10", "weighting.advanced.batch_size=4",
              "train.precision=fp64", "weighting.advanced.phi_steps=1"]
    r = _cli(overrides(data, one, *common))
    assert r.returncode == 0, r.stderr
    r = _cli(overrides(data, two, *common), nproc=2, port=free_port())
    assert r.returncode == 0, r.stderr
    assert final_params(one)["model.embed_tokens.weight"].dtype == torch.float64
    assert_same_models(one, two, atol=1e-8)
    wa, wb = events(one, "bilevel"), events(two, "bilevel")
    assert len(wa) == len(wb) == 10
    for x, y in zip(wa, wb, strict=True):
        assert x["ref_loss_after"] == pytest.approx(y["ref_loss_after"], rel=1e-10)
        assert x["hypergrad_norm"] == pytest.approx(y["hypergrad_norm"], rel=1e-8)
    sa = [r for r in (json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()) if "w_ess" in r]
    sb = [r for r in (json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()) if "w_ess" in r]
    assert len(sa) == len(sb) == 10  # train.max_steps=10, log.every=1
    for x, y in zip(sa, sb, strict=True):  # weight statistics over the global batch, logged by rank 0
        assert x["w_ess"] == pytest.approx(y["w_ess"], rel=1e-9) and x["w_max"] == pytest.approx(y["w_max"], rel=1e-9)


@pytest.mark.slow
def test_interleaved_schedule_updates_every_interval(data, tmp_path):
    run = tmp_path / "inter"
    train(data, run, "weighting.mode=dwm", "weighting.schedule=interleaved", "weighting.interval=3")
    steps = [e["step"] for e in events(run, "bilevel")]
    assert steps == list(range(0, STEPS, 3))  # one update every 3 LM steps, none extra at stage boundaries
    assert len(list((run / "weighting").glob("stage_*.safetensors"))) == 5  # stage snapshots still saved


def test_low_effective_sample_size_warns_and_counts(data, tmp_path, caplog):
    run = tmp_path / "ess"
    with caplog.at_level("WARNING", logger="dwm.weighting.diagnostics"):
        train(data, run, "weighting.mode=dwm", "weighting.advanced.updates_per_stage=1", "weighting.advanced.min_ess_fraction=1.0",
              "weighting.temperature=0.01")
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"w_ess"' in x][-1]
    assert last["w_ess"] < 8 and last["dwm_ess_warnings"] >= 1
    assert any("effective sample size" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_replay_on_another_selection(data, tmp_path):
    """A learned schedule transfers to another data selection: a manifest of half the samples, reversed."""
    import pyarrow as pa

    src = tmp_path / "src"
    train(data, src, "weighting.mode=dwm", "weighting.advanced.updates_per_stage=1", "weighting.temperature=0.5")
    sel = tmp_path / "sel.parquet"
    pq.write_table(pa.table({"sample_id": pa.array(np.arange(95, 47, -1), pa.int64())}), sel)
    rep = tmp_path / "rep"
    t = train(data, rep, f"weighting.mode={src}", f"data.selection={sel}")
    assert events(rep, "bilevel") == []
    assert t.weighter.temperature == 0.5  # replayed as learned, not with this config's default of 1
    got = t.weighter.net.state_dict()
    want = load_file(str(src / "weighting" / "stage_4.safetensors"))
    assert all(torch.equal(got[n], want[n]) for n in want)
    used = {int(i) for s in range(STEPS) for i in t.global_indices(s)}
    assert used <= set(range(48, 96))


# --- the levers of "a phi that learns the signal" -------------------------------------------------------------
class _Ctx:
    """The few TrainContext members PhiLearner.phi_backward uses."""

    def __init__(self, data_dir):
        from dwm.data.dataset import PreparedData

        self.data = PreparedData(data_dir, "train")
        self.model = None


def _learner(data, micro, *extra):
    """phi's learner on its own: a scorer bound to a float64 phi with non-uniform scores, no trainer."""
    from dwm.weighting.learner import PhiLearner
    from dwm.weighting.net import WeightingNet
    from dwm.weighting.probe import BilevelProbe
    from dwm.weighting.scorer import Scorer

    cfg = load_config(None, overrides(data, Path("/nonexistent"), "weighting.mode=dwm", *extra)).weighting
    torch.manual_seed(0)
    net = WeightingNet(cfg.net, 300, 3).double()
    torch.nn.init.normal_(net.head[-1].weight, std=0.5)  # non-uniform scores
    sc = Scorer(cfg.temperature, cfg.floor, loss_feature=False)
    sc.bind(net, torch.device("cpu"), micro)
    return PhiLearner.from_config(sc, BilevelProbe(sc, None, micro=micro), np.random.default_rng(0), cfg.advanced,
                                  global_batch=8)


def test_phi_loss_is_the_hand_computed_objective(data):
    """sum_i w_i t_i / n + kl * KL(w/n || uniform), w = n softmax(s / tau); its gradient into phi, computed over
    chunks of the micro-batch, equals the one-pass gradient."""
    # phi's passes in chunks of 4 and 2: the gradient must be the one-pass gradient
    learner = _learner(data, 4, "weighting.advanced.kl=0.7", "weighting.temperature=2.0")
    net = learner.scorer.net
    ctx = _Ctx(data["data"])
    ids = np.array([3, 10, 17, 40, 41, 77])
    t = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3, 1.1], dtype=torch.float64)
    net.zero_grad(set_to_none=True)
    got = learner.phi_backward(ctx, ids, t)
    chunked = [p.grad.clone() for p in net.parameters()]
    b = ctx.data.batch(ids)
    net.zero_grad(set_to_none=True)
    s = net(b.input_ids, b.n_tokens, b.domain_ids).double()
    p = torch.softmax(s / 2.0, 0)
    loss = (6 * p * t).sum() / 6 + 0.7 * (p * torch.log(p * 6)).sum()
    loss.backward()
    assert got == pytest.approx(float(loss.detach()), rel=1e-9)
    for a, p in zip(chunked, net.parameters()):
        torch.testing.assert_close(a, p.grad.to(a.dtype), rtol=1e-5, atol=1e-9)


def test_kl_optimum_is_exp_of_minus_target_over_lambda(data):
    """Minimising phi's objective over free scores lands on w ~ exp(-t / kl): the KL keeps the weights off the
    one-sample vertex that the linear objective alone would reach."""
    t = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    s = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([s], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-14,
                            tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        p = torch.softmax(s, 0)
        loss = (4 * p * t).sum() / 4 + 0.5 * (p * torch.log(p * 4)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    p = torch.softmax(s.detach(), 0)
    torch.testing.assert_close(p, torch.softmax(-t / 0.5, 0), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_std_normalisation_makes_phi_blind_to_the_hypergradient_scale(data, tmp_path, monkeypatch):
    """Every dL/dw scaled by 1000 (as a 1000x lookahead lr would, to first order) leaves phi's trajectory
    unchanged under normalize = 'std', and changes it under 'none'."""
    from dwm.weighting.probe import BilevelProbe

    probe = BilevelProbe.measure
    common = ["weighting.mode=dwm", "weighting.advanced.updates_per_stage=2", "weighting.advanced.kl=0.5", "weighting.advanced.phi_steps=2",
              "weighting.advanced.batch_size=16", "train.precision=fp64", "train.max_steps=5"]
    def scaled(factor):
        def _probe(self, *args):
            dL_dw, res = probe(self, *args)
            return dL_dw * factor, res
        return _probe

    def same(x, y):
        return all(torch.allclose(x[k], y[k], atol=1e-9, rtol=1e-7) for k in x)

    stages = {}
    for name, scale, norm in (("a", 1.0, "std"), ("b", 1000.0, "std"), ("c", 1.0, "none"), ("d", 1000.0, "none")):
        monkeypatch.setattr(BilevelProbe, "measure", scaled(scale))
        train(data, tmp_path / name, *common, f"weighting.advanced.normalize={norm}")
        stages[name] = load_file(str(tmp_path / name / "weighting" / "stage_1.safetensors"))
    assert same(stages["a"], stages["b"])
    assert not same(stages["c"], stages["d"])


@pytest.mark.slow
def test_probes_more_samples_and_fills_the_stage_buffer(data, tmp_path):
    run = tmp_path / "buf"
    train(data, run, "weighting.mode=dwm", "weighting.advanced.updates_per_stage=3", "weighting.advanced.batch_size=24",
          "weighting.advanced.phi_steps=2")
    ev = events(run, "bilevel")
    assert [e["probed"] for e in ev] == [24] * 15
    assert [e["buffer"] for e in ev] == [24, 48, 72] * 5  # reset at every stage start
    from dwm.data.dataset import PreparedData

    dom = PreparedData(data["data"], "train").domain_ids
    for k in range(5):  # signal/stage_k: the stage's three probed batches, each as its update saw it
        t = pq.read_table(run / "signal" / f"stage_{k}.parquet").to_pydict()
        assert len(t["sample_id"]) == 72 and set(t["stage"]) == {k} and set(t["step"]) == {k * STEPS // 5}
        assert t["domain"] == [("a", "b", "c")[dom[i]] for i in t["sample_id"]]
        for j, e in enumerate(ev[3 * k: 3 * k + 3]):
            raw, sig = np.array(t["dL_dw"][24 * j: 24 * j + 24]), np.array(t["signal"][24 * j: 24 * j + 24])
            assert np.linalg.norm(raw) == pytest.approx(e["hypergrad_norm"], rel=1e-9)
            assert np.allclose(sig, -raw / e["hypergrad_std"], rtol=1e-12, atol=0)
            assert raw.std(ddof=1) == pytest.approx(e["hypergrad_std"], rel=1e-9)  # torch.std: unbiased
    run2 = tmp_path / "buf2"  # the last two stages' probes, and hypergradients of the first 16 tokens only
    import dwm.weighting.probe as W

    widths = []
    orig = W.hypergradient
    W.hypergradient = lambda model, ids, *a, **k: (widths.append(ids.shape[1]), orig(model, ids, *a, **k))[1]
    try:
        train(data, run2, "weighting.mode=dwm", "weighting.advanced.updates_per_stage=3", "weighting.advanced.batch_size=24",
              "weighting.advanced.phi_steps=2", "weighting.advanced.buffer_stages=2", "weighting.advanced.probe_len=16")
    finally:
        W.hypergradient = orig
    assert [e["buffer"] for e in events(run2, "bilevel")] == [24, 48, 72] + [96, 120, 144] * 4
    assert widths == [16] * 15
    for k in range(5):  # the buffer spans two stages; a stage's signal file holds its own updates' samples only
        t = pq.read_table(run2 / "signal" / f"stage_{k}.parquet").to_pydict()
        assert len(t["sample_id"]) == 72 and set(t["stage"]) == {k}


def test_probed_records_read_checkpoints_of_the_earlier_format():
    """Before phi's buffer and the signal records were one list, a checkpoint held (ids, dL/dw / spread, stage)
    triples and the current stage's (ids, dL/dw, spread, step, stage) records apart."""
    ids = [np.array([1, 2]), np.array([3]), np.array([4, 5])]
    old = {"buffer": [(ids[0], np.array([0.5, -1.0]), 0), (ids[1], np.array([2.0]), 1),
                      (ids[2], np.array([1.5, 3.0]), 1)],
           "signal": [(ids[2], np.array([0.3, 0.6]), 0.2, 12, 1)]}
    rec = probed_records(old)
    assert [(list(r[0]), list(r[1]), r[2], r[3], r[4]) for r in rec] == [([1, 2], [0.5, -1.0], 1.0, -1, 0),
                                                                         ([3], [2.0], 1.0, -1, 1),
                                                                         ([4, 5], [0.3, 0.6], 0.2, 12, 1)]
    rec = probed_records({"buffer": old["buffer"]})  # before signal/ existed: every stage at spread 1
    assert [(list(r[0]), r[2], r[3], r[4]) for r in rec] == [([1, 2], 1.0, -1, 0), ([3], 1.0, -1, 1),
                                                             ([4, 5], 1.0, -1, 1)]
    new = {"probed": [(ids[0], np.array([0.1, 0.2]), 0.5, 0, 0)]}  # the current format, as state_dict() writes it
    rec = probed_records(new)
    assert [(list(r.ids), list(r.dL_dw), r.spread, r.step, r.stage) for r in rec] == [([1, 2], [0.1, 0.2], 0.5, 0, 0)]
    assert list(rec[0].target) == [0.2, 0.4]


def test_resample_draws_batches_by_the_scores(data, tmp_path):
    """apply = resample: each step's batch is drawn from its candidate window of the data stream in proportion to
    the scores, and trained with weight 1; a weighting model that prefers one domain fills the batches with it."""
    from dwm.run import build_trainer

    cfg = load_config(None, overrides(data, tmp_path / "res", "weighting.mode=dwm", "weighting.apply=resample",
                                      "weighting.candidates=3", "weighting.advanced.updates_per_stage=0",
                                      "weighting.advanced.update_fraction=0.01", "data.shuffle=false"))
    t = build_trainer(cfg)
    assert t.selector.name == "dwm" and t.selector.n_cand == 24
    assert t.selector.scorer is t.weighter.scorer  # one scorer, held by both
    target = t.train_data.domains.index("c")  # a weighting model that scores domain c 20 higher than the rest
    t.weighter.scorer.score_ids = lambda rows, ids, model=None: 20.0 * (t.train_data.domain_ids[ids] == target)
    seen = []
    orig_w = t.weighter.weights
    t.weighter.weights = lambda b, losses=None: (seen.append(b.sample_ids.tolist()), orig_w(b, losses))[1]
    t.train()
    stream = t.selector.stream
    for s, ids in enumerate(seen):
        window = stream(s * 24, 24)
        assert set(ids) <= set(window.tolist())
        n_c = int((t.train_data.domain_ids[window] == target).sum())
        assert sum(t.train_data.domain_ids[i] == target for i in ids) == min(8, n_c)
    rec = [json.loads(x) for x in (tmp_path / "res" / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("w_ess") is None for r in rec)  # nothing weighted within the batch
    assert sum(1 for r in rec if "share/c" in r) == STEPS
