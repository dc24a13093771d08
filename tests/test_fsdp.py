"""train.parallel=fsdp (FSDP2 on CPU with gloo): two sharded processes train the model one process trains, and the
model two DDP processes train; a killed sharded run resumes exactly; the checkpoint loads without FSDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dwm.data.batch import Batch
from dwm.train.weighter import Weighter


class IdWeighter(Weighter):
    """Non-uniform weights from the sample ids, so the per-rank normalisation by B_local is exercised."""

    def weights(self, batch: Batch, losses=None) -> torch.Tensor:
        return (batch.sample_ids % 3).float() * 0.75 + 0.25


class LossIdWeighter(IdWeighter):
    """The same weights, but asks for the LM's losses: the trainer's forward-all-then-one-backward path."""

    needs_losses = True


def _overrides(data_dir, out, parallel="fsdp"):
    # grad_clip 0.05: the clip is active at every step, so the sharded gradient norm is exercised
    return [f"data.dir={data_dir}", f"out={out}", "model.spec=tiny", "train.global_batch_tokens=256",
            "train.micro_batch_size=2", "train.max_steps=3", "log.every=1", "log.progress=false",
            "checkpoint.every=0", "train.device=cpu", "optim.warmup_steps=1", "optim.grad_clip=0.05",
            f"train.parallel={parallel}"]


def _full_params(model) -> dict[str, torch.Tensor]:
    from dwm.train import fsdp as fsdp_utils

    return {k: fsdp_utils.full_tensor(v).detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, port: int, data_dir: str, out: str, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from dwm.run import load_config
    from dwm.train.trainer import Trainer

    try:
        res = {}
        for name, parallel, weighter, extra in [
                ("fsdp", "fsdp", IdWeighter, []), ("fsdp_losses", "fsdp", LossIdWeighter, []),
                ("fsdp_ac", "fsdp", IdWeighter, ["train.activation_checkpointing=true"]),
                ("ddp", "ddp", IdWeighter, [])]:
            tr = Trainer(load_config(None, [*_overrides(data_dir, f"{out}_{name}", parallel), *extra]),
                         weighter=weighter())
            assert tr.sharded == (parallel == "fsdp") and tr.plan.grad_accum == 2
            if tr.sharded:  # each rank holds half of every (dim-0) parameter
                p = tr.model.get_input_embeddings().weight
                assert isinstance(p, DTensor) and p.to_local().shape[0] * 2 == p.shape[0]
            metrics = tr.train()
            res[name] = {"params": _full_params(tr.model), "metrics": metrics}
        # the unsharded (ddp) checkpoint of step 3 resumed sharded, one step further
        tr = Trainer(load_config(None, [*_overrides(data_dir, f"{out}_ddp", "fsdp"), "train.max_steps=4"]),
                     resume=True, weighter=IdWeighter())
        assert tr.sharded and tr.step == 3
        tr.train()
        res["ddp_to_fsdp"] = _full_params(tr.model)
        torch.save(res, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_fsdp_equals_one_process_and_ddp(prepared_dir, tmp_path, free_port):
    from transformers import LlamaForCausalLM

    from dwm.run import load_config
    from dwm.train.trainer import Trainer

    res = tmp_path / "res"
    mp.spawn(_worker, args=(2, free_port(), str(prepared_dir), str(tmp_path / "two"), str(res)), nprocs=2,
             join=True)
    r0, r1 = (torch.load(f"{res}.{r}", weights_only=False) for r in (0, 1))
    single = Trainer(load_config(None, _overrides(prepared_dir, tmp_path / "one")), weighter=IdWeighter())
    assert not single.sharded  # fsdp on one process trains unsharded
    single.train()
    one = single.model.state_dict()
    for k, v in one.items():
        for name in ("fsdp", "fsdp_losses", "fsdp_ac", "ddp"):
            torch.testing.assert_close(r0[name]["params"][k], v, atol=1e-6, rtol=1e-5, msg=f"{name} {k}")
            assert torch.equal(r0[name]["params"][k], r1[name]["params"][k])  # one model, gathered on each rank
        torch.testing.assert_close(r0["fsdp"]["params"][k], r0["ddp"]["params"][k], atol=1e-6, rtol=1e-5)
    for name in ("fsdp", "fsdp_losses", "fsdp_ac", "ddp"):
        for key in ("loss", "loss_mean", "grad_norm"):
            assert r0[name]["metrics"][key] == pytest.approx(single.last_metrics[key], abs=1e-5), (name, key)
    assert single.last_metrics["grad_norm"] > 0.05  # the clip was active
    # the sharded run's checkpoint is a plain Hugging Face model with the trained weights
    ck = tmp_path / "two_fsdp" / "checkpoints" / "step_00000003"
    assert json.loads((ck / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded = LlamaForCausalLM.from_pretrained(ck / "model")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, r0["fsdp"]["params"][k], atol=0, rtol=0)
    state = torch.load(ck / "trainer_state.pt", weights_only=False)
    assert state["fsdp_sharded"] is True
    assert "model.embed_tokens.weight" in state["optimizer"]["state"]  # full, keyed by parameter name
    # either kind of checkpoint resumes the other way: one more step from step 3 (sharded -> 1 process here,
    # unsharded -> sharded in the workers) equals the 1-process run's own resumed step
    ref = Trainer(load_config(None, [*_overrides(prepared_dir, tmp_path / "one"), "train.max_steps=4"]), resume=True,
                  weighter=IdWeighter())
    ref.train()
    back = Trainer(load_config(None, [*_overrides(prepared_dir, tmp_path / "two_fsdp"), "train.max_steps=4"]),
                   resume=True, weighter=IdWeighter())
    assert not back.sharded and back.step == 3
    back.train()
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(back.model.state_dict()[k], v, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r0["ddp_to_fsdp"][k], v, atol=1e-6, rtol=1e-5)


def _torchrun(args: list[str], port: int, kill_after: int | None = None) -> subprocess.CompletedProcess:
    """`dwm train ARGS` on 2 CPU processes under torchrun; with kill_after, every rank SIGKILLs itself right after
    that step (tests/kill_after.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = ([str(Path(__file__).with_name("kill_after.py")), str(kill_after)] if kill_after
              else ["--module", "dwm.cli", "train"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", *script]
    return subprocess.run([*cmd, *args], check=False, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_fsdp_sigkill_and_resume_matches_uninterrupted(prepared_dir, tmp_path, free_port):
    common = [f"data.dir={prepared_dir}", "model.spec=tiny", "train.global_batch_tokens=256",
              "train.micro_batch_size=2", "train.max_steps=5", "checkpoint.every=2", "log.every=1",
              "log.progress=false", "train.device=cpu", "train.parallel=fsdp"]
    killed = _torchrun(["--out", str(tmp_path / "run"), *common], free_port(), kill_after=3)
    assert killed.returncode != 0, killed.stderr[-2000:]  # killed after step 3: the last checkpoint is step 2
    assert (tmp_path / "run" / "checkpoints" / "LATEST").read_text().strip() == "step_00000002"
    resumed = _torchrun(["--out", str(tmp_path / "run"), "--resume"], free_port())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = _torchrun(["--out", str(tmp_path / "ref"), *common], free_port())
    assert ref.returncode == 0, ref.stderr[-3000:]

    def losses(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if "loss" in r]

    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["checkpoint"] for e in events if e.get("event") == "resume"] == ["step_00000002"]
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert [s for s, _ in b] == [1, 2, 3, 4, 5]
    for (_, la), (_, lb) in zip(a, b):
        assert lb == la  # exact: the same weights, optimizer state, data position and RNG
    wa = load_file(str(tmp_path / "ref" / "checkpoints" / "step_00000005" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000005" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wb[k], wa[k]), k


@pytest.mark.slow
def test_fsdp_dwm_bilevel_update_equals_one_process(tmp_path, free_port):
    """The fd hypergradient on sharded parameters (gradients from FSDP's reduce-scatter, which averages: the
    weighted gradient is rescaled to the sum, the reference gradient kept; perturbations of the local shards;
    the same passes on every rank): 2 sharded processes give 1 process's dL/dw, phi and LM. float64, as the DDP
    test does (tests/test_dwm.py), so that a real difference is not hidden by float32 rounding."""
    from tokenizers import Tokenizer

    from dwm.data.dataset import PreparedData
    from dwm.testing import make_synthetic_prepared

    make_synthetic_prepared(tmp_path / "data", n_train=96, n_val=16, seq_len=32, vocab_size=300, domains=("a", "b"))
    tok = Tokenizer.from_file(str(tmp_path / "data" / "tokenizer.json"))
    val = PreparedData(tmp_path / "data", "val")
    with open(tmp_path / "ref.jsonl", "w") as f:
        f.writelines(json.dumps({"text": tok.decode(val.tokens[i, : val.n_tokens[i]].tolist())[:160]}) + "\n"
                     for i in range(8))
    common = [f"data.dir={tmp_path / 'data'}", "model.spec=tiny", "train.global_batch_tokens=256",
              "train.micro_batch_size=2", "train.max_steps=4", "train.precision=fp64", "train.device=cpu",
              "train.parallel=fsdp", "weighting.mode=dwm", f"weighting.reference={tmp_path / 'ref.jsonl'}",
              "weighting.stages=2", "weighting.advanced.updates_per_stage=1", "weighting.advanced.batch_size=4",
              "weighting.net.width=32", "weighting.net.heads=2", "weighting.probe_size=8", "weighting.advanced.ref_batch_size=4",
              "log.progress=false", "log.every=1", "checkpoint.every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, "-m", "dwm.cli", "train", "--out", str(tmp_path / "one"), *common],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(["--out", str(tmp_path / "two"), *common], free_port())
    assert two.returncode == 0, two.stderr[-3000:]
    import pyarrow.parquet as pq

    for k in range(2):  # stage k's bi-level update: the samples it probed and their dL/dw
        a, b = (pq.read_table(r / "signal" / f"stage_{k}.parquet").to_pydict() for r in (tmp_path / "one",
                                                                                          tmp_path / "two"))
        assert a["sample_id"] == b["sample_id"] and len(a["dL_dw"]) == 4
        assert any(abs(x) > 1e-6 for x in a["dL_dw"])
        np_a, np_b = torch.tensor(a["dL_dw"]), torch.tensor(b["dL_dw"])
        torch.testing.assert_close(np_b, np_a, rtol=1e-6, atol=1e-12)
        pa_, pb = (load_file(str(r / "weighting" / f"stage_{k}.safetensors")) for r in (tmp_path / "one",
                                                                                       tmp_path / "two"))
        for n in pa_:
            torch.testing.assert_close(pb[n], pa_[n], rtol=1e-6, atol=1e-10)
    ev = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (tmp_path / "one",
                                                                                         tmp_path / "two")]
    ua, ub = ([e for e in recs if e.get("event") == "bilevel"] for recs in ev)
    assert len(ua) == len(ub) == 2
    for x, y in zip(ua, ub, strict=True):
        assert y["ref_loss_after"] == pytest.approx(x["ref_loss_after"], rel=1e-10)
    wa, wb = final_model(tmp_path / "one"), final_model(tmp_path / "two")
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=0, atol=1e-9)


def final_model(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "LATEST").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model" / "model.safetensors"))


def _hyper_worker(rank, world, path, port):
    torch.set_num_threads(1)  # forked child: never enter the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from test_bilevel import data, tiny_lm

    from dwm.errors import UserError
    from dwm.train import fsdp as fsdp_utils
    from dwm.weighting.bilevel import adam_lookahead, hypergradient

    out = {}
    try:
        model = fsdp_utils.shard_model(tiny_lm(), torch.device("cpu"), world, bf16=False)
        ids, n, w, ref, mask = data(B=6, R=4)
        sl, rs = slice(3 * rank, 3 * rank + 3), slice(2 * rank, 2 * rank + 2)
        opt = _adam_steps(model, ids[sl], n[sl])
        snap = [p.detach().to_local().clone() for p in model.parameters()]
        r = hypergradient(model, ids[sl], n[sl], w[sl], ref[rs], mask[rs], lr=1e-2, precond=adam_lookahead(opt, model))
        out["adam"] = {"dw": r.dL_dw, "after": r.ref_loss_after, "ok": r.ok}
        w0 = w.clone()
        w0[3:] = 0  # rank 1's samples all weight 0: it still takes part in the weighted pass
        # one sample per chunk: rank 0 runs 3 weighted chunks, rank 1 none of its own (it runs 3 at weight 0)
        r = hypergradient(model, ids[sl], n[sl], w0[sl], ref[rs], mask[rs], lr=1e-2, global_batch_size=6,
                          chunk_size=1)
        out["zero"] = {"dw": r.dL_dw, "after": r.ref_loss_after, "ok": r.ok}
        params = list(model.parameters())
        out["restored"] = all(type(p).__name__ == "DTensor" and torch.equal(p.to_local(), s) and p.grad is None
                              for p, s in zip(params, snap))
        try:
            hypergradient(model, ids[sl], n[sl], w[sl], ref[rs], mask[rs], lr=1e-2, backend="exact")
        except UserError as e:
            out["exact"] = str(e)
        bf16 = fsdp_utils.shard_model(tiny_lm(torch.float32), torch.device("cpu"), world, bf16=True)
        try:
            hypergradient(bf16, ids[sl], n[sl], w[sl], ref[rs], mask[rs], lr=1e-2, measure_before=False)
        except UserError as e:
            out["bf16"] = str(e)
        torch.save(out, f"{path}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _adam_steps(model, ids, n, steps=2):
    """Two AdamW steps on the mean loss (momentum and second moments for the lookahead to use)."""
    from dwm.train.losses import per_sample_nll

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(steps):
        per_sample_nll(model(input_ids=ids).logits, ids, n).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


@pytest.mark.slow
def test_fsdp_hypergradient_equals_one_process(free_port, tmp_path):
    """hypergradient on an LM sharded over 2 gloo ranks (3 of 6 samples and 2 of 4 reference passages each) gives
    the unsharded 1-process dL/dw: with AdamW's lookahead (its state sharded too), and with one rank whose samples
    all weigh 0 (in chunks of one sample: the ranks' chunk counts differ, every rank still runs as many); the shards come back bit-identical with no .grad; "exact" and bf16 compute refuse in one line."""
    import time

    from test_bilevel import data, tiny_lm

    from dwm.weighting.bilevel import adam_lookahead, hypergradient

    model = tiny_lm()
    ids, n, w, ref, mask = data(B=6, R=4)
    opt = _adam_steps(model, ids, n)
    one = hypergradient(model, ids, n, w, ref, mask, lr=1e-2, precond=adam_lookahead(opt, model))
    w0 = w.clone()
    w0[3:] = 0
    one0 = hypergradient(model, ids, n, w0, ref, mask, lr=1e-2, global_batch_size=6)
    port = free_port()
    # fork, not spawn (as tests/test_bilevel.py): spawn re-imports transformers in each child
    ctx = mp.start_processes(_hyper_worker, args=(2, str(tmp_path), port), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("FSDP workers did not finish in 240 s")
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for key, ref_res in (("adam", one), ("zero", one0)):
        assert all(p[key]["ok"] for p in parts) and ref_res.ok
        both = torch.cat([p[key]["dw"] for p in parts])
        assert both.abs().max() > 1e-6
        torch.testing.assert_close(both, ref_res.dL_dw, rtol=1e-6, atol=1e-12, msg=key)
        assert parts[0][key]["after"] == pytest.approx(ref_res.ref_loss_after, rel=1e-9)
    assert all(p["restored"] for p in parts)
    assert all("'exact'" in p["exact"] and "FSDP" in p["exact"] and "\n" not in p["exact"] for p in parts)
    assert all("bf16" in p["bf16"] and "\n" not in p["bf16"] for p in parts)


def test_one_process_fsdp_trains_unsharded_and_states_convert(make_cfg, tmp_path):
    """Fast checks without a process group: fsdp on one process is plain training (bit for bit), the decoder layers
    are the units, and torch's position-keyed optimizer state keyed by name loads back to the same state."""
    from dwm.train import fsdp as fsdp_utils
    from dwm.train.model import build_model
    from dwm.train.trainer import Trainer, make_optimizer

    a = Trainer(make_cfg("train.parallel=fsdp", "train.max_steps=2", out=tmp_path / "a"), weighter=IdWeighter())
    b = Trainer(make_cfg("train.parallel=ddp", "train.max_steps=2", out=tmp_path / "b"), weighter=IdWeighter())
    assert not a.sharded and not fsdp_utils.is_sharded(a.model)
    assert [type(m).__name__ for m in fsdp_utils.decoder_layers(a.model)] == ["LlamaDecoderLayer"] * 2
    a.train()
    b.train()
    for k, v in b.model.state_dict().items():
        assert torch.equal(a.model.state_dict()[k], v), k
    sd = a.optimizer.state_dict()
    by_name = fsdp_utils._by_name(a.model, a.optimizer, sd)
    assert set(by_name["state"]) == {n for n, _ in a.model.named_parameters()}
    model = build_model("tiny", a.plan.vocab_size)
    opt = make_optimizer(model, a.cfg.optim)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # (it adds initial_lr to the groups, as the trainer's)
    fsdp_utils.load_full_optimizer_state(model, opt, sd)  # position-keyed: keyed by name on the way
    got = opt.state_dict()
    def groups(state):  # (torch.distributed.checkpoint hands the betas back as a list)
        return [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in state["param_groups"]]

    assert groups(got) == groups(sd)
    for i, st in sd["state"].items():
        for key, val in st.items():
            assert torch.equal(got["state"][i][key], val), (i, key)
