"""Two-process gloo DDP equals one process with the same global batch (weighted, with grad accumulation)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from dwm.data.batch import Batch
from dwm.train.weighter import Weighter


class IdWeighter(Weighter):
    """Non-uniform weights from the sample ids, so the per-rank normalisation by B_local is exercised."""

    def weights(self, batch: Batch, losses=None) -> torch.Tensor:
        return (batch.sample_ids % 3).float() * 0.75 + 0.25


class LossIdWeighter(IdWeighter):
    """The same weights, but asks for the LM's losses: the trainer's forward-all-then-one-backward path."""

    needs_losses = True


def _overrides(data_dir, out):
    return [f"data.dir={data_dir}", f"out={out}", "model.spec=tiny", "train.global_batch_tokens=256",
            "train.micro_batch_size=2", "train.max_steps=3", "log.every=1", "log.progress=false",
            "checkpoint.every=0", "train.device=cpu", "optim.warmup_steps=1"]


def _worker(rank: int, world: int, port: int, data_dir: str, out: str, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from dwm.run import load_config
    from dwm.train.trainer import Trainer

    try:
        tr = Trainer(load_config(None, _overrides(data_dir, out)), weighter=IdWeighter())
        assert tr.world_size == world and tr.plan.local_batch_size == 4 and tr.plan.grad_accum == 2
        local = [tr.local_indices(s).tolist() for s in range(3)]
        metrics = tr.train()
        sd = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
        tl = Trainer(load_config(None, _overrides(data_dir, out + "_losses")), weighter=LossIdWeighter())
        tl.train()
        sd_l = {k: v.detach().clone() for k, v in tl.model.state_dict().items()}
        torch.save({"params": sd, "params_losses": sd_l, "local": local, "metrics": metrics},
                   f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_equals_one_process(prepared_dir, tmp_path, free_port):
    from dwm.run import load_config
    from dwm.train.trainer import Trainer

    res = tmp_path / "res"
    mp.spawn(_worker, args=(2, free_port(), str(prepared_dir), str(tmp_path / "ddp"), str(res)), nprocs=2,
             join=True)
    r0, r1 = (torch.load(f"{res}.{r}", weights_only=False) for r in (0, 1))
    single = Trainer(load_config(None, _overrides(prepared_dir, tmp_path / "one")), weighter=IdWeighter())
    for s in range(3):  # the union over ranks of a step's samples is the 1-process global batch, in order
        assert r0["local"][s] + r1["local"][s] == single.global_indices(s).tolist()
    single.train()
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0["params"][k], v, atol=1e-6, rtol=1e-5)
        assert torch.equal(r0["params"][k], r1["params"][k])  # DDP keeps ranks identical
        # a needs_losses weighter under DDP (forwards first, one backward): the same model
        torch.testing.assert_close(r0["params_losses"][k], v, atol=1e-6, rtol=1e-5)
        assert torch.equal(r0["params_losses"][k], r1["params_losses"][k])
    assert r0["metrics"]["loss"] == pytest.approx(single.last_metrics["loss"], abs=1e-5)
    assert r0["metrics"]["loss_mean"] == pytest.approx(single.last_metrics["loss_mean"], abs=1e-5)
    assert (tmp_path / "ddp" / "checkpoints" / "step_00000003" / "model" / "model.safetensors").is_file()
