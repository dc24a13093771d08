"""The Trainer: data order, LR schedule, gradient accumulation, DDP, checkpoints and metrics.

The trainer owns the loop and the bookkeeping; three kinds of component plug into it, each seeing only a
`TrainContext` (dwm/train/context.py):
- a `Selector` (dwm/train/selector.py) names the samples of each global batch (default: the seeded data order);
- a `Weighter` (dwm/train/weighter.py) returns their weights once per optimizer step, and the trainer minimises
  sum_i w_i l_i / B_local per micro-batch (DDP's or FSDP's gradient mean then gives the global weighted mean). Uniform
  training is the weighter that returns ones, so a DWM run and its uniform baseline share every other line;
- `Callback`s (dwm/train/callbacks.py) are told about step ends and every logged record.
The trainer never imports a particular weighter or selector: the caller (dwm.run) builds them from the config.

Determinism: the default selector's order is a pure function of (seed, epoch) (or the selection manifest's order),
and step s consumes positions [s*G, (s+1)*G) of that stream; rank r takes the r-th contiguous B_local slice, so the
union over ranks of a step's samples is the 1-process global batch, and a resumed run sees exactly the same batches.

Preemption: SIGTERM (what a cluster sends) or SIGINT during `train()` lets the current optimizer step finish, writes
a checkpoint (atomically), logs a `preempted` event, sets `stopped_by` to the signal's name and raises `Preempted`
(a KeyboardInterrupt: no caller mistakes a stopped run for a finished one); `dwm train` then exits with
PREEMPTED_EXIT (75, EX_TEMPFAIL: "try again") and `--resume` continues bit-identically. A second Ctrl-C interrupts
at once (the previous checkpoint is intact); a repeated SIGTERM is ignored (torchrun forwards the cluster's). Under DDP the ranks agree on the step to stop
at (one all-reduce of a flag per step).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dwm.config import validate
from dwm.data.batch import Batch
from dwm.data.dataset import PreparedData, data_fingerprint
from dwm.data.tokenizer import load_prepared_tokenizer
from dwm.errors import UserError
from dwm.host import keep_freed_memory
from dwm.nn.losses import per_sample_nll
from dwm.train import distributed as dist_utils
from dwm.train import fsdp as fsdp_utils
from dwm.train.callbacks import Callback
from dwm.train.checkpoint import remove_stale_tmp, save_checkpoint
from dwm.train.config import Plan, TrainerConfig, plan_for_data
from dwm.train.context import TrainContext
from dwm.train.model import (
    build_model,
    enable_activation_checkpointing,
)
from dwm.train.preempt import PREEMPTED_EXIT, STOP_SIGNALS, Preempted, Preemptible
from dwm.train.resume import Resumable
from dwm.train.selector import Selector, SequentialSelector
from dwm.train.weighter import UniformWeighter, Weighter

__all__ = ["PREEMPTED_EXIT", "STOP_SIGNALS", "Preempted", "Trainer", "load_selection", "lr_factor", "make_optimizer"]


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings, projections), not on norm gains or biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps (step 0 gets 1/warmup), then cosine from 1 to min_ratio at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def load_selection(path: str, n: int, data_dir: str | Path | None = None, split: str = "train") -> np.ndarray:
    """sample_ids of a selection manifest (restricts and orders the data); UserError when unusable, or when the
    manifest records the fingerprint of another prepared directory than data_dir (`dwm select` writes it into the
    parquet schema metadata; manifests without one are accepted)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"selection manifest {p} does not exist")
    if data_dir is not None:
        _check_fingerprint(p, data_dir, split)
    try:
        table = pq.read_table(p, columns=["sample_id"])
    except Exception as e:
        raise UserError(f"selection manifest {p}: cannot read a `sample_id` column ({e})") from e
    ids = table.column("sample_id").to_numpy(zero_copy_only=False)
    if ids.dtype.kind not in "iu":
        raise UserError(f"selection manifest {p}: sample_id must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64)
    if len(ids) == 0:
        raise UserError(f"selection manifest {p} selects no samples")
    if ids.min() < 0 or ids.max() >= n:
        raise UserError(f"selection manifest {p}: sample_id out of range [0, {n})")
    return ids


def _check_fingerprint(p: Path, data_dir: str | Path, split: str) -> None:
    try:
        md = pq.read_schema(p).metadata or {}
        info = json.loads(md[b"dwm.selection"]) if b"dwm.selection" in md else {}
    except (OSError, ValueError):  # unreadable (ArrowInvalid is a ValueError): the read below says so
        return
    fp = info.get("fingerprint")
    if fp and fp != data_fingerprint(data_dir, split):
        raise UserError(f"selection manifest {p} was made from another prepared directory "
                        f"({info.get('data_dir')}, split {info.get('split')}): its fingerprint does not match "
                        f"{data_dir} split {split}; run `dwm select --data {data_dir}` again")


class Trainer(Resumable, Preemptible):
    """One training run. Build it, then call `train()`; see the module docstring for what it guarantees.

    cfg: a TrainerConfig (or a composed config that extends it, such as dwm.run.RunConfig: the whole of it is
    written to RUN_DIR/config.toml). weighter / selector default to uniform weights and the data order.

    Construction order (what a component can rely on): process group, data, tokenizer, model, optimizer, scheduler;
    on resume the model/optimizer/scheduler/RNG/step are restored from the checkpoint; then `selector.attach(ctx)`,
    `weighter.attach(ctx)`, then (on resume) their `load_state_dict(saved state)`, then the callbacks' `on_attach`.
    """

    def __init__(self, cfg: TrainerConfig, *, resume: bool = False, weighter: Weighter | None = None,
                 selector: Selector | None = None, callbacks: list[Callback] | tuple[Callback, ...] = ()):
        self.cfg = cfg
        validate(cfg)
        info = dist_utils.setup(cfg.train.device)
        self.rank, self.world_size, self.device = info.rank, info.world_size, info.device
        if self.device.type == "cpu" and cfg.train.keep_freed_memory:
            keep_freed_memory()
        self.plan: Plan = plan_for_data(cfg, world_size=self.world_size)
        self.run_dir = Path(cfg.out)
        self.is_main = self.rank == 0
        t = cfg.train
        self._seed_everything(t.seed)
        self.train_data = PreparedData(cfg.data.dir, cfg.data.split)
        if len(self.train_data) == 0:
            raise UserError(f"{cfg.data.dir}: split {cfg.data.split!r} has no samples")
        self.selection = (load_selection(cfg.data.selection, len(self.train_data), cfg.data.dir, cfg.data.split)
                          if cfg.data.selection else None)
        self.pool = (self.selection if self.selection is not None
                     else np.arange(len(self.train_data), dtype=np.int64))
        tok_path = self.train_data.tokenizer_path
        if not tok_path.is_file():
            raise UserError(f"{cfg.data.dir}: missing tokenizer.json")
        # encodes text as the prepared rows hold it (meta.json's BOS policy; dwm.data.tokenizer)
        self.tokenizer, self._tokenizer_changed = load_prepared_tokenizer(tok_path, self.train_data.meta)
        self.model = build_model(cfg.model.spec, self.plan.vocab_size, attn_implementation=cfg.model.attn_implementation,
                                 seed=t.seed, max_seq_len=self.plan.seq_len, init=cfg.model.init,
                                 dtype=torch.float64 if t.precision == "fp64" else torch.float32).to(self.device)
        if t.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        # fsdp: shard in place (dwm/train/fsdp.py); one process trains unsharded, as ddp does
        self.sharded = t.parallel == "fsdp" and self.world_size > 1
        if self.sharded:
            fsdp_utils.shard_model(self.model, self.device, self.world_size,
                                   bf16=use_bf16 and self.device.type == "cuda")
            if self.device.type == "cuda":  # FSDP's MixedPrecisionPolicy casts the gathered parameters instead
                self.autocast_dtype = None
        self.ddp_model: torch.nn.Module = (DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None) if self.world_size > 1 and not self.sharded else self.model)
        self.forward_model = torch.compile(self.ddp_model) if t.compile else self.ddp_model
        self.optimizer = make_optimizer(self.model, cfg.optim)
        p = self.plan
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, p.warmup_steps, p.total_steps, cfg.optim.min_lr_ratio))
        self.total_steps = p.total_steps
        self.step = 0
        self.tokens_seen = 0
        self.weighter = weighter if weighter is not None else UniformWeighter()
        self.selector = selector if selector is not None else SequentialSelector()
        self.callbacks = list(callbacks)
        self.ctx = TrainContext(self)
        self.last_metrics: dict[str, Any] = {}
        self.stopped_by: str | None = None  # the signal's name when train() stopped early on SIGTERM / SIGINT
        self._stop_requested: int | None = None
        if self.is_main:
            gone = remove_stale_tmp(self.ckpt_root)
            if gone:
                print(f"dwm train: warning: removed {len(gone)} incomplete checkpoint temp file(s) left by an "
                      f"interrupted save: {', '.join(gone)}", file=sys.stderr)
        state = self._resume() if resume else None
        if not resume:
            self._start_fresh()
        self.selector.attach(self.ctx)
        self.weighter.attach(self.ctx)
        if state is not None:
            self.selector.load_state_dict(state.get("selector", {}))
            self.weighter.load_state_dict(state.get("weighter", {}))
        for cb in self.callbacks:
            cb.on_attach(self.ctx)

    # ------------------------------------------------------------ setup

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    # ------------------------------------------------------------ data order

    def global_indices(self, step: int) -> np.ndarray:
        """Sample ids of the whole global batch of optimizer step `step` (the selector's choice)."""
        return self.selector.batch_ids(self.ctx, step)

    def local_indices(self, step: int) -> np.ndarray:
        b = self.plan.local_batch_size
        return self.global_indices(step)[self.rank * b:(self.rank + 1) * b]

    def local_batch(self, step: int) -> Batch:
        return self.train_data.batch(self.local_indices(step)).to(self.device)

    # ------------------------------------------------------------ logging

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON object to RUN_DIR/metrics.jsonl (rank 0 only); `step` defaults to the current step.
        Then the callbacks' `on_log` (experiment trackers)."""
        if not self.is_main:
            return
        rec = {"step": self.step, **record}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec, default=float) + "\n")
        for cb in self.callbacks:
            cb.on_log(self.ctx, rec)

    # ------------------------------------------------------------ the step

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_nll(self, mb: Batch) -> torch.Tensor:
        with self.autocast():
            logits = self.forward_model(input_ids=mb.input_ids).logits
        return per_sample_nll(logits, mb.input_ids, mb.n_tokens)

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's batch (the weighter's before_step has run): weights, accumulated
        weighted backward, clip, step, schedule. Returns (weighted loss, plain mean loss, grad norm) as device
        tensors (no host sync)."""
        p = self.plan
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        m, B = p.micro_batch_size, p.local_batch_size
        if self.weighter.needs_losses:
            loss_w, loss_sum = self._step_losses_first(batch)
        else:
            w = self.weighter.weights(batch).to(self.device, torch.float32)
            loss_w = torch.zeros((), device=self.device)
            loss_sum = torch.zeros((), device=self.device)
            for i in range(p.grad_accum):
                mb = batch.slice(i * m, (i + 1) * m)
                sync = self.world_size == 1 or i == p.grad_accum - 1
                with self._no_sync(sync):
                    nll = self._forward_nll(mb)
                    loss = (w[i * m:(i + 1) * m] * nll).sum() / B
                    loss.backward()
                loss_w += loss.detach()
                loss_sum += nll.detach().sum()
        clip = self.cfg.optim.grad_clip
        # sharded (DTensor) gradients: the norm's reduction over ranks is part of the DTensor ops
        grad_norm = fsdp_utils.full_tensor(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf")))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # free the gradients between steps (a weighter's update runs there)
        self.scheduler.step()
        return loss_w, loss_sum / B, grad_norm

    def _no_sync(self, sync: bool):
        """DDP: no gradient all-reduce on the micro-batches before the last. FSDP reduce-scatters every micro-batch
        into the sharded gradients (keeping unsharded gradients across micro-batches would cost the memory FSDP
        saves)."""
        if sync or self.sharded:
            return contextlib.nullcontext()
        return self.ddp_model.no_sync()  # type: ignore[operator]

    def _step_losses_first(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """For a weighter that needs the LM's per-sample losses: every micro-batch's forward first (graphs kept;
        under DDP all but the last without gradient sync), the weights from the detached losses, then one
        backward of the whole weighted sum, so DDP reduces once, as in the plain path (FSDP too)."""
        p = self.plan
        m, B = p.micro_batch_size, p.local_batch_size
        nlls = []
        for i in range(p.grad_accum):
            mb = batch.slice(i * m, (i + 1) * m)
            sync = self.world_size == 1 or i == p.grad_accum - 1
            with self._no_sync(sync):
                nlls.append(self._forward_nll(mb))
        nll = torch.cat(nlls)
        w = self.weighter.weights(batch, nll.detach()).to(self.device, torch.float32)
        loss = (w * nll).sum() / B
        loss.backward()
        return loss.detach(), nll.detach().sum()

    def save(self) -> None:
        """Checkpoint the current step (all ranks call it; rank 0 writes)."""
        state = self._state()
        model = self.model
        if self.sharded:  # gather the full weights (collective) into a plain HF model on rank 0
            full = fsdp_utils.full_model_state(self.model)
            model = fsdp_utils.plain_model(self.model, full) if self.is_main else self.model
        if self.is_main:
            c = self.cfg.checkpoint
            save_checkpoint(self.ckpt_root, self.step, model, state, c.keep_last, c.keep_every)
        dist_utils.barrier()

    def train(self) -> dict[str, Any]:
        """Run to total_steps; returns the last logged metrics. On SIGTERM / SIGINT: finish the step, checkpoint it,
        set `stopped_by` and raise `Preempted`."""
        with self._stop_on_signals():
            metrics = self._train()
        if self.stopped_by is not None:
            raise Preempted(f"dwm train: stopped by {self.stopped_by} after step {self.step}; checkpoint saved; "
                            f"continue with `dwm train --out {self.run_dir} --resume` (exit code {PREEMPTED_EXIT})")
        return metrics

    def _train(self) -> dict[str, Any]:
        p, cfg = self.plan, self.cfg
        tokens_per_step = p.global_batch_size * p.seq_len
        bar = None
        if self.is_main and cfg.log.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        t_last, steps_since = time.perf_counter(), 0
        while self.step < self.total_steps:
            self.weighter.before_step(self.ctx, self.step)  # before the batch is chosen: it may choose it
            batch = self.local_batch(self.step)
            lr_used = self.scheduler.get_last_lr()[0]
            loss_w, loss_mean, grad_norm = self.train_step(batch)
            self.step += 1
            self.tokens_seen += tokens_per_step
            steps_since += 1
            rec = None
            if self.step % cfg.log.every == 0 or self.step == self.total_steps:
                vals = dist_utils.all_mean([loss_w.item(), loss_mean.item()], self.device)
                now = time.perf_counter()
                rec = {"loss": vals[0], "loss_mean": vals[1], "lr": lr_used, "grad_norm": float(grad_norm),
                       "tokens_per_s": steps_since * tokens_per_step / max(now - t_last, 1e-9),
                       "tokens_seen": self.tokens_seen, **self.selector.step_metrics(),
                       **self.weighter.step_metrics()}
                self.last_metrics = {"step": self.step, **rec}
                self.log(rec)
                t_last, steps_since = now, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{vals[0]:.4f}", lr=f"{lr_used:.2e}")
            if bar is not None:
                bar.update(1)
            every = cfg.checkpoint.every
            saved = (every and self.step % every == 0) or self.step == self.total_steps
            if saved:
                self.save()
            for cb in self.callbacks:
                cb.on_step_end(self.ctx, rec)
            if self.step < self.total_steps and self._should_stop():
                self._stop_after_step(saved)
                break
        if bar is not None:
            bar.close()
        for cb in self.callbacks:
            cb.on_train_end(self.ctx)
        return self.last_metrics
