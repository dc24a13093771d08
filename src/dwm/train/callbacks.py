"""Callbacks: small components told about the loop's events (OLMo-core style), for behaviour that is neither
weighting nor selection (experiment trackers, profiling, fault injection in tests). They see a `TrainContext`
only."""

from __future__ import annotations

from dwm.train.context import TrainContext


class Callback:
    def on_attach(self, ctx: TrainContext) -> None:
        """After the weighter and selector are attached."""

    def on_log(self, ctx: TrainContext, record: dict) -> None:
        """After `record` (a step's metrics or an event, with its `step`) was appended to metrics.jsonl; rank 0
        only. It can come before `on_attach` (a resume's or a weighter's attach event)."""

    def on_step_end(self, ctx: TrainContext, metrics: dict | None) -> None:
        """After an optimizer step and its checkpoint (if any); metrics is the logged record or None."""

    def on_train_end(self, ctx: TrainContext) -> None:
        """After the last step."""
