"""Trainer: weighted loss, equality with a hand-written loop, accumulation, data order, selection manifests,
checkpoints, resume (in-process and after a real SIGKILL), and clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from dwm.data.batch import Batch
from dwm.data.dataset import PreparedData
from dwm.errors import UserError
from dwm.run import load_config
from dwm.train.losses import per_sample_nll
from dwm.train.model import build_model
from dwm.train.trainer import Trainer
from dwm.train.weighter import Weighter


class IdWeighter(Weighter):
    """Deterministic non-uniform weights from the sample ids."""

    def weights(self, batch: Batch, losses=None) -> torch.Tensor:
        return (batch.sample_ids % 3).float() * 0.75 + 0.25


class RandomWeighter(Weighter):
    """Draws from the global torch RNG and keeps a counter: resume must restore both."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.seen_steps: list[int] = []

    def before_step(self, ctx, step):
        self.seen_steps.append(step)

    def weights(self, batch, losses=None):
        self.calls += 1
        return torch.rand(len(batch)) * 2

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hand_loop(data_dir: Path, steps: int, G: int, weight_fn=None) -> torch.nn.Module:
    """Plain PyTorch: sequential batches, AdamW (decay on matrices), warmup 1 + cosine to 10%, clip 1.0."""
    data = PreparedData(data_dir, "train")
    model = build_model("tiny", data.vocab_size, seed=0, max_seq_len=data.seq_len)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=5e-4, betas=(0.9, 0.95), eps=1e-8)

    def factor(s):
        return 1.0 if s < 1 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 1) / (steps - 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for s in range(steps):
        b = data.batch(np.arange(s * G, (s + 1) * G) % len(data))
        nll = per_sample_nll(model(input_ids=b.input_ids).logits, b.input_ids, b.n_tokens)
        loss = nll.mean() if weight_fn is None else (weight_fn(b) * nll).sum() / G
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model


@pytest.mark.parametrize("weighted", [False, True])
def test_matches_hand_written_loop(make_cfg, prepared_dir, weighted):
    cfg = make_cfg("train.micro_batch_size=8", "data.shuffle=false")
    tr = Trainer(cfg, weighter=IdWeighter() if weighted else None)
    tr.train()
    ref = hand_loop(prepared_dir, 4, 8, IdWeighter().weights if weighted else None)
    got, want = params(tr.model), params(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_weighted_loss_is_hand_computed(make_cfg):
    tr = Trainer(make_cfg(), weighter=IdWeighter())
    batch = tr.local_batch(0)
    with torch.no_grad():
        nll = per_sample_nll(tr.model(input_ids=batch.input_ids).logits, batch.input_ids, batch.n_tokens)
    w = IdWeighter().weights(batch)
    assert not torch.allclose(w, torch.ones_like(w))
    loss_w, loss_mean, _ = tr.train_step(batch)  # 2 micro-batches of 4
    assert float(loss_w) == pytest.approx(float((w * nll).sum() / len(batch)), abs=1e-6)
    assert float(loss_mean) == pytest.approx(float(nll.mean()), abs=1e-6)
    assert abs(float(loss_w) - float(loss_mean)) > 1e-3


def test_grad_accumulation_equals_big_batch(make_cfg, tmp_path):
    big = Trainer(make_cfg("train.micro_batch_size=8", "train.max_steps=3", out=tmp_path / "a"),
                  weighter=IdWeighter())
    small = Trainer(make_cfg("train.micro_batch_size=2", "train.max_steps=3", out=tmp_path / "b"),
                    weighter=IdWeighter())
    assert (big.plan.grad_accum, small.plan.grad_accum) == (1, 4)
    big.train()
    small.train()
    for k, v in params(big.model).items():
        torch.testing.assert_close(params(small.model)[k], v, atol=1e-6, rtol=1e-5)


def test_data_order_epochs_and_run_files(make_cfg, tmp_path):
    tr = Trainer(make_cfg("train.max_steps=3", "log.every=1"))
    n, G = len(tr.train_data), tr.plan.global_batch_size
    epoch0 = np.concatenate([tr.global_indices(s) for s in range(n // G)])
    epoch1 = np.concatenate([tr.global_indices(s) for s in range(n // G, 2 * n // G)])
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, np.arange(n))
    tr.train()
    run = Path(tr.cfg.out)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert {"loss", "loss_mean", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
        assert r["tokens_seen"] == r["step"] * 256
    assert recs[0]["lr"] == pytest.approx(5e-4) and recs[-1]["lr"] < recs[1]["lr"]
    assert load_config(run / "config.toml") == tr.cfg
    assert (run / "tokenizer.json").read_bytes() == tr.train_data.tokenizer_path.read_bytes()
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_00000003"


def _manifest(path: Path, ids, name="sample_id", type_=None):
    pq.write_table(pa.table({name: pa.array(ids, type_ or pa.int64())}), path)
    return path


def test_selection_manifest_restricts_and_orders(make_cfg, tmp_path):
    ids = [40, 3, 17, 9, 0, 63, 22, 5, 31, 12, 8, 50]
    m = _manifest(tmp_path / "sel.parquet", ids)
    tr = Trainer(make_cfg(f"data.selection={m}"))
    assert tr.global_indices(0).tolist() == ids[:8]
    assert tr.global_indices(1).tolist() == ids[8:] + ids[:4]
    assert tr.local_batch(0).sample_ids.tolist() == ids[:8]
    bad = [(_manifest(tmp_path / "a.parquet", [1, 2], name="id"), "sample_id"),
           (_manifest(tmp_path / "b.parquet", [1, 64]), "out of range"),
           (_manifest(tmp_path / "c.parquet", [1.0, 2.0], type_=pa.float64()), "integers"),
           (_manifest(tmp_path / "d.parquet", []), "no samples")]
    (tmp_path / "e.parquet").write_text("not parquet")
    bad.append((tmp_path / "e.parquet", "cannot read"))
    for path, match in bad:
        with pytest.raises(UserError, match=match):
            Trainer(make_cfg(f"data.selection={path}", out=tmp_path / path.stem))


def test_resume_in_process_restores_rng_and_weighter(make_cfg, tmp_path):
    full = Trainer(make_cfg("train.max_steps=6", out=tmp_path / "full"), weighter=RandomWeighter())
    full.train()
    part = Trainer(make_cfg("train.max_steps=6", "checkpoint.every=3", out=tmp_path / "part"),
                   weighter=RandomWeighter())
    part.total_steps = 3  # stop early; the schedule still spans 6 steps
    part.train()
    torch.rand(50)  # disturb the global RNG: the checkpoint's state must win
    w = RandomWeighter()
    resumed = Trainer(make_cfg("train.max_steps=6", "checkpoint.every=3", out=tmp_path / "part"),
                      resume=True, weighter=w)
    assert resumed.step == 3 and w.calls == 3
    resumed.train()
    assert w.seen_steps == [3, 4, 5] and w.calls == 6
    for k, v in params(full.model).items():
        assert torch.equal(params(resumed.model)[k], v), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4, 5, 6]  # 3 twice: the step record, then the resume event


def test_checkpoint_errors(make_cfg, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(UserError, match="no checkpoint"):
        Trainer(make_cfg(out=out), resume=True)
    Trainer(make_cfg("train.max_steps=4", "checkpoint.every=2", out=out)).train()
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["LATEST", "step_00000002", "step_00000004"]
    with pytest.raises(UserError, match="already has checkpoints"):
        Trainer(make_cfg("train.max_steps=4", out=out))
    with pytest.raises(UserError, match="global batch"):
        Trainer(make_cfg("train.max_steps=4", "train.global_batch_tokens=512", out=out), resume=True)
    # newest damaged, an older good one exists: warn and resume from it
    (ck / "step_00000004" / "model" / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        tr = Trainer(make_cfg("train.max_steps=4", out=out), resume=True)
    assert tr.step == 2
    # every checkpoint damaged: a clear error
    state = ck / "step_00000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(UserError, match="no usable checkpoint"):
        Trainer(make_cfg("train.max_steps=4", out=out), resume=True)


def test_retention_keeps_last_and_every(make_cfg, tmp_path):
    out = tmp_path / "r"
    Trainer(make_cfg("train.max_steps=7", "checkpoint.every=1", "checkpoint.keep_last=2",
                     "checkpoint.keep_every=3", "log.every=7", out=out)).train()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["LATEST", "step_00000003", "step_00000006", "step_00000007"]


def _cli(args, kill_after: int | None = None):
    """`dwm train ARGS` in a subprocess; with kill_after, SIGKILLed right after that step (tests/kill_after.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = ([sys.executable, str(Path(__file__).with_name("kill_after.py")), str(kill_after)] if kill_after
           else [sys.executable, "-m", "dwm.cli", "train"])
    return subprocess.Popen([*cmd, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(prepared_dir, tmp_path):
    common = [f"data.dir={prepared_dir}", "model.spec=tiny", "train.global_batch_tokens=256",
              "train.micro_batch_size=4", "train.max_steps=7", "checkpoint.every=2", "log.every=1",
              "log.progress=false", "train.device=cpu"]
    killed = _cli(["--out", str(tmp_path / "run"), *common], kill_after=5)
    # the uninterrupted reference runs here meanwhile, single-threaded like the subprocesses (conftest)
    Trainer(load_config(None, [*common, f"out={tmp_path / 'ref'}"])).train()
    out_k = killed.communicate(timeout=300)
    assert killed.returncode == -9, out_k[1][-2000:]  # SIGKILL after step 5: last checkpoint is step 4
    assert (tmp_path / "run" / "checkpoints" / "LATEST").read_text().strip() == "step_00000004"
    resumed = _cli(["--out", str(tmp_path / "run"), "--resume"])  # config from RUN_DIR/config.toml
    out_r = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out_r[1][-2000:]

    def final(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in recs if "loss" in r]

    a, b = final(tmp_path / "ref"), final(tmp_path / "run")
    assert [r["step"] for r in b] == list(range(1, 8))
    assert b[-1]["loss"] == pytest.approx(a[-1]["loss"], abs=1e-6)
    wa = load_file(str(tmp_path / "ref" / "checkpoints" / "step_00000007" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000007" / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)


def test_mixture_manifest_has_the_shares_and_trains(make_cfg, tmp_path):
    from dwm.data.dataset import PreparedData
    from dwm.data.mixture import mixture_ids, parse_shares, write_manifest

    data = PreparedData(make_cfg().data.dir, "train")
    ids = mixture_ids(data.domain_ids, data.domains, parse_shares("a=0.75"), 40, seed=3)
    dom = np.array(data.domains)[data.domain_ids[ids]]
    assert len(ids) == 40 and (dom == "a").sum() == 30 and (dom == "b").sum() == 10
    assert len(set(ids[dom == "a"].tolist())) == 30  # without replacement while the domain has enough rows
    assert np.array_equal(ids, mixture_ids(data.domain_ids, data.domains, {"a": 0.75}, 40, seed=3))
    m = write_manifest(ids, tmp_path / "mix.parquet")
    tr = Trainer(make_cfg(f"data.selection={m}", "train.max_steps=2"))
    assert tr.global_indices(1).tolist() == ids[8:16].tolist()
    with pytest.raises(UserError, match="unknown domain"):
        mixture_ids(data.domain_ids, data.domains, {"x": 0.5}, 10)
    with pytest.raises(UserError, match="sum to at most 1"):
        mixture_ids(data.domain_ids, data.domains, {"a": 0.7, "b": 0.6}, 10)
    with pytest.raises(UserError, match="domain=share"):
        parse_shares("a:0.5")


@pytest.mark.slow
def test_keep_freed_memory_is_wired_and_reuses_large_blocks(make_cfg, monkeypatch):
    """train.keep_freed_memory calls dwm.host.keep_freed_memory on CPU (and only then); once it took effect, a
    64 MB block freed and allocated again is served from the heap: no fresh zero pages (glibc would fault all
    16k of its 4 kB pages again through mmap). Checked in a fresh process, as `dwm train` runs, after the
    warm-up the heap needs to grow (dwm.host), so that what this process allocated before does not decide it."""
    calls = []
    monkeypatch.setattr("dwm.train.trainer.keep_freed_memory", lambda: calls.append(1))
    Trainer(make_cfg("train.keep_freed_memory=false"))
    assert calls == []
    Trainer(make_cfg())
    assert calls == [1]
    if not (sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")):
        pytest.skip("mallopt is glibc's")
    probe = """
import resource, torch
from dwm.host import keep_freed_memory
assert keep_freed_memory() is True
n = 16 * 2**20  # float32 -> 64 MB
for _ in range(12):  # warm-up: the first blocks grow the heap (measured: faults stop after 2-9 allocations)
    torch.ones(n).sum()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.ones(n).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    # without the setting each of the 4 blocks faults all its 16,384 pages (65,536 in all); with it none does, and
    # at most one stray block is tolerated (the heap's growth ends at a varying allocation, once seen at the 9th)
    assert int(out.stdout.strip().splitlines()[-1]) < 2 * 16384
