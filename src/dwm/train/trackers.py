"""Experiment trackers (`log.tracker`): callbacks that send every record the trainer logs to TensorBoard or
Weights & Biases. RUN_DIR/metrics.jsonl stays the record; a tracker is a view of it.

What is sent: the numbers of each record, at the record's `step` (`flatten_record`):
- a step record's keys as they are (`loss`, `lr`, `w_domain/a`, ...);
- an event record's keys under the event's name (`bilevel/ref_loss_before`, `stage/probe_seconds`), and under its
  `when` too where it has one (`diagnose/before/capture_spearman`, `diagnose/after/...`), so that two records of
  one event at the same step stay apart;
- nested dicts flattened as `a/b` (`stage/probe_weight_by_domain/a`), booleans as 0/1; strings, None and lists
  are labels, not scalars, and are left out.

TensorBoard writes event files under RUN_DIR/tb/ (a resumed run purges the events after its checkpoint, as
metrics.jsonl is truncated). wandb runs offline by default (`log.tracker_offline`): the run lands in
RUN_DIR/wandb/ and needs no network (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it later); a resumed run is a
new wandb run starting at the checkpoint's step. Both packages are optional extras; a missing one is a one-line
error when the trainer is built, before any training.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dwm.errors import UserError
from dwm.train.callbacks import Callback
from dwm.train.config import LogConfig
from dwm.train.context import TrainContext

_LABEL_KEYS = ("when",)  # string fields that name which record of an event this is: part of the tag


def _scalars(value: Any, tag: str) -> Iterator[tuple[str, float]]:
    if isinstance(value, (bool, int, float)):  # booleans as 0/1
        yield tag, float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _scalars(v, f"{tag}/{k}")
    elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        try:
            yield tag, float(value.item())
        except (TypeError, ValueError):
            return


def flatten_record(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {tag: number}) of one metrics.jsonl record (see the module docstring)."""
    step = int(record.get("step", 0))
    event = record.get("event")
    prefix = ""
    if isinstance(event, str) and event:
        labels = [str(record[k]) for k in _LABEL_KEYS if isinstance(record.get(k), str)]
        prefix = "/".join([event, *labels]) + "/"
    out: dict[str, float] = {}
    for k, v in record.items():
        if k in ("step", "event") or k in _LABEL_KEYS:
            continue
        for tag, x in _scalars(v, f"{prefix}{k}"):
            out[tag] = x
    return step, out


class Tracker(Callback):
    """Base: opens its writer at the first record (rank 0 only), writes each record, closes at the end."""

    name = "base"

    def __init__(self, cfg: LogConfig, config: dict[str, Any] | None = None):
        self.cfg = cfg
        self.config = config or {}
        self._open = False

    def open(self, ctx: TrainContext) -> None:
        raise NotImplementedError

    def write(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def on_log(self, ctx: TrainContext, record: dict) -> None:
        if not self._open:
            self.open(ctx)
            self._open = True
        step, scalars = flatten_record(record)
        if scalars:
            self.write(step, scalars)

    def on_train_end(self, ctx: TrainContext) -> None:
        if self._open:
            self.close()
            self._open = False


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, cfg: LogConfig, config: dict[str, Any] | None = None):
        super().__init__(cfg, config)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError("log.tracker = tensorboard needs the tensorboard package: "
                            "pip install 'dwm-llm[tensorboard]'") from e
        self._writer_cls = SummaryWriter
        self.writer = None

    def open(self, ctx: TrainContext) -> None:
        # a resumed run re-runs the steps after its checkpoint (step T): hide their old events (step > T), as
        # metrics.jsonl drops them
        self.writer = self._writer_cls(log_dir=str(Path(ctx.run_dir) / "tb"),
                                       purge_step=ctx.step + 1 if ctx.step > 0 else None, flush_secs=10)
        if self.config and ctx.step == 0:
            import json

            self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=2, default=str) + "\n```", 0)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        assert self.writer is not None
        for tag, x in scalars.items():
            self.writer.add_scalar(tag, x, global_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, cfg: LogConfig, config: dict[str, Any] | None = None):
        super().__init__(cfg, config)
        try:
            import wandb
        except ImportError as e:
            raise UserError("log.tracker = wandb needs the wandb package: pip install 'dwm-llm[wandb]'") from e
        self._wandb = wandb
        self.run = None

    def open(self, ctx: TrainContext) -> None:
        wandb = self._wandb
        run_dir = Path(ctx.run_dir)
        try:
            self.run = wandb.init(project=self.cfg.tracker_project, name=run_dir.name, dir=str(run_dir),
                                  config=self.config, mode="offline" if self.cfg.tracker_offline else "online",
                                  reinit="finish_previous")
        except Exception as e:  # no login, no network, a bad project name: one line, not a traceback
            raise UserError(f"log.tracker = wandb: wandb.init failed: {str(e).splitlines()[0] if str(e) else e!r}"
                            ) from e
        # every record carries its own training step (events too, several per step, and a resume goes back)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        assert self.run is not None
        self.run.log({"step": step, **scalars})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def make_tracker(cfg: LogConfig, config: dict[str, Any] | None = None) -> Tracker | None:
    """The tracker `log.tracker` names (None for 'none'); `config` is the run's whole config, shown by the
    tracker. Raises a one-line UserError when its package is missing."""
    if cfg.tracker == "none":
        return None
    return TRACKERS[cfg.tracker](cfg, config)
