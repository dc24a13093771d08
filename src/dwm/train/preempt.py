"""Preemption: what SIGTERM (a cluster's notice) and SIGINT (Ctrl-C) do to `Trainer.train()`. PREEMPTED_EXIT and
`Preempted` (the KeyboardInterrupt `train()` raises after checkpointing, which `dwm train` turns into exit code
75), STOP_SIGNALS, and `Preemptible`, the Trainer's part that installs the handlers for the loop's duration (a stop
is asked for, a second Ctrl-C interrupts at once, a repeated SIGTERM is ignored), agrees across ranks on the step
to stop at and checkpoints and logs that step."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from dwm.train import distributed as dist_utils

PREEMPTED_EXIT = 75  # `dwm train` stopped by SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL): --resume it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(KeyboardInterrupt):
    """train() stopped on SIGTERM / SIGINT after checkpointing its last step (`dwm` exits with `exit_code`)."""

    exit_code = PREEMPTED_EXIT


class Preemptible:
    """The Trainer's signal handling (a base of `dwm.train.trainer.Trainer`; uses its step, rank, log and save)."""

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While training: SIGTERM / SIGINT ask the loop to stop after the current step; then a second SIGINT
        (Ctrl-C again) interrupts at once and a repeated SIGTERM is ignored (a launcher forwarding what the workers
        already got). Handlers can only be set from the main thread; elsewhere signals keep their usual effect."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        # a signal the process ignores (SIGINT of a background job, `nohup`) stays ignored
        previous = {s: h for s in STOP_SIGNALS if (h := signal.getsignal(s)) is not signal.SIG_IGN}

        def handler(signum, frame):
            if self._stop_requested is not None:
                if signum == signal.SIGINT:  # Ctrl-C again: stop now (the last checkpoint is complete)
                    raise KeyboardInterrupt
                return  # SIGTERM again (torchrun forwards the cluster's to workers that got it too): keep saving
            self._stop_requested = signum
            if self.is_main:
                print(f"\ndwm train: {signal.Signals(signum).name} received: finishing step {self.step + 1}, then "
                      "saving a checkpoint (Ctrl-C again stops at once)", file=sys.stderr, flush=True)

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _should_stop(self) -> bool:
        """Whether a stop signal arrived (on any rank: the ranks must stop at the same step)."""
        flag = 1.0 if self._stop_requested is not None else 0.0
        if self.world_size > 1:
            flag = dist_utils.all_max(flag, self.device)
        return flag > 0

    def _stop_after_step(self, saved: bool) -> None:
        """A stop signal arrived: checkpoint this step (unless just done), log it, and let the loop end."""
        if not saved:
            self.save()
        self.stopped_by = signal.Signals(self._stop_requested).name if self._stop_requested else "a stop signal"
        self.log({"event": "preempted", "signal": self.stopped_by})
