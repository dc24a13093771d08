"""Test helper, run as a script: `python tests/kill_after.py STEP <dwm train arguments>` runs `dwm train` with a
callback that SIGKILLs this process right after optimizer step STEP (and its checkpoint, if any): the fault
injection of the resume tests lives here, not in the library."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from dwm import run as dwm_run
from dwm.train.callbacks import Callback


class KillAfter(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, ctx, metrics) -> None:
        if ctx.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser()
    dwm_run.add_arguments(parser)
    args = parser.parse_args(sys.argv[2:])
    sys.exit(dwm_run.run(args, callbacks=[KillAfter(int(sys.argv[1]))]))
