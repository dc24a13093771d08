"""The run directory's start and the guarded resume: `Resumable`, the Trainer's part that starts a fresh run (refusing
a directory with checkpoints; config.toml, tokenizer.json, an empty metrics.jsonl), resumes from the newest
checkpoint (batch shape and model checked; model, optimizer, scheduler, RNG states, step restored; metrics of
later steps dropped) and gathers the state every checkpoint holds."""

from __future__ import annotations

import json
import random
import shutil
from typing import Any

import numpy as np
import torch

from dwm.config import to_dict, to_toml
from dwm.errors import UserError
from dwm.train import distributed as dist_utils
from dwm.train import fsdp as fsdp_utils
from dwm.train.checkpoint import load_latest
from dwm.train.model import saved_state_dict, tied_parameter_names


class Resumable:
    """Fresh start, resume and checkpoint state (a base of `dwm.train.trainer.Trainer`; uses its model, optimizer,
    scheduler, plan, run directory and log)."""

    def _start_fresh(self) -> None:
        """A new run: refuse to overwrite one that has checkpoints."""
        if (self.ckpt_root / "LATEST").exists():
            raise UserError(f"{self.run_dir} already has checkpoints: use --resume, or a new --out")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "metrics.jsonl").write_text("")
            self._write_run_files()
        dist_utils.barrier()

    def _write_run_files(self) -> None:
        (self.run_dir / "config.toml").write_text(to_toml(self.cfg))
        if self._tokenizer_changed:  # a tokenizer.json whose post-processor disagreed with meta.json's BOS policy
            self.tokenizer.save(str(self.run_dir / "tokenizer.json"))
        else:
            shutil.copyfile(self.train_data.tokenizer_path, self.run_dir / "tokenizer.json")

    def _resume(self) -> dict[str, Any]:
        path, model_sd, state = load_latest(self.ckpt_root)
        if state.get("global_batch_size") != self.plan.global_batch_size or state.get("seq_len") != self.plan.seq_len:
            raise UserError(f"--resume: checkpoint {path.name} was trained with global batch "
                            f"{state.get('global_batch_size')} x seq_len {state.get('seq_len')}, this config has "
                            f"{self.plan.global_batch_size} x {self.plan.seq_len}")
        if set(model_sd) - set(self.model.state_dict()):  # names save_pretrained renamed (GPT-NeoX's lm_head)
            model_sd = saved_state_dict(fsdp_utils.plain_like(self.model) if self.sharded else self.model,
                                        path / "model")
        try:
            if self.sharded:  # every rank passes the full weights; each keeps its shards
                missing, unexpected = fsdp_utils.load_full_model_state(self.model, model_sd)
            else:
                missing, unexpected = self.model.load_state_dict(model_sd, strict=False)
        except RuntimeError as e:  # shapes differ: another model size or vocabulary
            first = next((x.strip() for x in str(e).splitlines() if "size mismatch" in x), str(e).splitlines()[0])
            raise UserError(f"--resume: checkpoint {path.name} does not match model {self.cfg.model.spec!r} "
                            f"({first.rstrip('.')})") from None
        # save_pretrained writes one name of each tied group (LLaMA: model.embed_tokens.weight, GPT-2:
        # transformer.wte.weight); the others may be missing when one of their group was loaded
        tied = set().union(*(g for g in tied_parameter_names(self.model) if g - set(missing)))
        if unexpected or set(missing) - tied:
            raise UserError(f"--resume: checkpoint {path.name} does not match model {self.cfg.model.spec!r} "
                            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
        if tied and not self.sharded:
            self.model.tie_weights()
        if self.sharded or state.get("fsdp_sharded"):  # to re-shard, or saved by name by a sharded run
            fsdp_utils.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        rng = state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_run_files()
            self._truncate_metrics(self.step)
        dist_utils.barrier()
        self.log({"event": "resume", "checkpoint": path.name})
        return state

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics of steps after the checkpoint (they are re-run), so the file reads as one clean run."""
        mpath = self.run_dir / "metrics.jsonl"
        if not mpath.is_file():
            return
        keep = []
        for line in mpath.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if rec.get("step", 0) <= step:
                keep.append(line)
        mpath.write_text("".join(x + "\n" for x in keep))

    def _state(self) -> dict[str, Any]:
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "data_position": self.step * self.plan.global_batch_size,
            "global_batch_size": self.plan.global_batch_size, "seq_len": self.plan.seq_len,
            "world_size": self.world_size, "fsdp_sharded": self.sharded,
            # fsdp: the full optimizer state keyed by parameter name (rank 0; collective)
            "optimizer": (fsdp_utils.full_optimizer_state(self.model, self.optimizer) if self.sharded
                          else self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(), "rng": dist_utils.all_gather_object(rng),
            "weighter": self.weighter.state_dict(), "selector": self.selector.state_dict(),
            "config": to_dict(self.cfg),
        }
