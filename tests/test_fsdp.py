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
        for name, parallel, weighter in [("fsdp", "fsdp", IdWeighter), ("fsdp_losses", "fsdp", LossIdWeighter),
                                         ("ddp", "ddp", IdWeighter)]:
            tr = Trainer(load_config(None, _overrides(data_dir, f"{out}_{name}", parallel)), weighter=weighter())
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
        for name in ("fsdp", "fsdp_losses", "ddp"):
            torch.testing.assert_close(r0[name]["params"][k], v, atol=1e-6, rtol=1e-5, msg=f"{name} {k}")
            assert torch.equal(r0[name]["params"][k], r1[name]["params"][k])  # one model, gathered on each rank
        torch.testing.assert_close(r0["fsdp"]["params"][k], r0["ddp"]["params"][k], atol=1e-6, rtol=1e-5)
    for name in ("fsdp", "fsdp_losses", "ddp"):
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

