"""TrainContext: everything a weighter, selector or callback may use from the trainer, and nothing else; and
`Component`, the life cycle weighters and selectors share.

The trainer hands its components this view, never itself, so the contract is this file: a component that needs
something not listed here is a change to the contract, made here, not an attribute reached into the trainer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover (annotations only: importing the contract stays free of torch)
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    from dwm.data.dataset import PreparedData
    from dwm.train.config import OptimConfig, Plan


class TrainContext:
    """A read-only view of one training run (see the module docstring)."""

    def __init__(self, trainer: Any):
        self._t = trainer  # the Trainer (not imported here: the trainer imports this module)

    # the model and its optimisation
    @property
    def model(self) -> torch.nn.Module:
        """The LM, unwrapped (no DDP, no torch.compile): for a component's own forwards, e.g. bi-level lookaheads.
        Under train.parallel=fsdp it is sharded in place (its parameters are DTensor shards, dwm/train/fsdp.py):
        every rank must run the same forwards, since each gathers the parameters from all ranks."""
        return self._t.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The LM's AdamW (read its state; a component never steps it)."""
        return self._t.optimizer

    @property
    def lr(self) -> float:
        """The learning rate of the upcoming optimizer step."""
        return float(self._t.scheduler.get_last_lr()[0])

    @property
    def optim(self) -> OptimConfig:
        """The optimiser section of the config (peak lr, schedule floor, betas)."""
        return self._t.cfg.optim

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context the training forward runs under."""
        return self._t.autocast()

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The training forward's autocast dtype (None: full precision), for a component's own chunked passes."""
        return self._t.autocast_dtype

    # progress
    @property
    def step(self) -> int:
        """Optimizer steps completed (the upcoming step's 0-based index)."""
        return self._t.step

    @property
    def total_steps(self) -> int:
        return self._t.total_steps

    @property
    def plan(self) -> Plan:
        """Batch sizes, accumulation, steps, seq_len and vocab size of this run on this world size."""
        return self._t.plan

    @property
    def seed(self) -> int:
        return self._t.cfg.train.seed

    # data
    @property
    def data(self) -> PreparedData:
        """The training split."""
        return self._t.train_data

    @property
    def pool(self) -> np.ndarray:
        """The sample ids this run may train on: the selection manifest's, else every row of the split."""
        return self._t.pool

    @property
    def shuffle(self) -> bool:
        """Whether the data order is reshuffled each epoch (data.shuffle; a manifest's order is always kept)."""
        return self._t.cfg.data.shuffle and self._t.selection is None

    @property
    def tokenizer(self) -> Tokenizer:
        return self._t.tokenizer

    # processes and outputs
    @property
    def device(self) -> torch.device:
        return self._t.device

    @property
    def rank(self) -> int:
        return self._t.rank

    @property
    def world_size(self) -> int:
        return self._t.world_size

    @property
    def is_main(self) -> bool:
        return self._t.rank == 0

    @property
    def run_dir(self) -> Path:
        return self._t.run_dir

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to RUN_DIR/metrics.jsonl (rank 0 only; `step` defaults to the current step)."""
        self._t.log(record)


class Component:
    """A pluggable part of the loop (weighter, selector): built from its config section, attached once, logged,
    and checkpointed with the run."""

    name = "base"

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def attach(self, ctx: TrainContext) -> None:
        """Called once, after the model, optimizer, data and (on --resume) the checkpoint are in place; a
        component may build its modules here. On resume, `load_state_dict` follows."""

    def step_metrics(self) -> dict[str, float]:
        """Scalars to log with the current step (cheap, already-computed values)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
