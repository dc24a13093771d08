"""Where a method's per-shard work runs: `local` (a process pool on this machine, all cores by default) or `ray`
(Ray Data tasks, on a local Ray instance or a cluster address). Both map a top-level function over the pool's shards
and return the results in shard order; everything order- or seed-dependent (fitting sums, Gumbel noise, the budget)
happens on the driver, so the two engines write identical manifests.

On a cluster, every node must see the prepared directory at the same path (a shared file system) and have dwm
installed; Ray is an optional dependency (`pip install 'dwm-llm[ray]'`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from typing import Any

from dwm.data import rayjobs
from dwm.errors import UserError
from dwm.progress import Progress

ENGINES = ("local", "ray")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class LocalEngine:
    """A fork-based process pool (one task per shard, in order); in-process when there is one worker or task."""

    name = "local"
    shared_disk = True  # tasks may leave files for later tasks (the same machine)

    def __init__(self, workers: int = 0):
        self.workers = workers or default_workers()

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if self.workers <= 1 or len(items) <= 1:
            return _with_progress((fn(x) for x in items), len(items))
        with mp.get_context("fork").Pool(min(self.workers, len(items))) as pool:
            return _with_progress(pool.imap(fn, items, chunksize=1), len(items))

    def close(self) -> None:
        pass


class RayEngine:
    """Ray Data: one task per shard (dwm.data.rayjobs), results gathered on the driver in shard order."""

    name = "ray"
    shared_disk = False  # a cluster's tasks may run anywhere

    def __init__(self, workers: int = 0, address: str | None = None):
        self.workers = workers or default_workers()
        self.started = rayjobs.start(self.workers, address)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return _with_progress(rayjobs.imap(fn, items), len(items))

    def close(self) -> None:
        if self.started:
            rayjobs.stop()
            self.started = False


def _with_progress(results, total: int) -> list[Any]:
    """The results, in order, counting shards done: a bar on a terminal, a line per interval in a log."""
    out = []
    with Progress("dwm select: shards", total=total, unit="shard", enabled=None) as bar:
        for r in results:
            out.append(r)
            bar.update(1)
    return out


def make_engine(name: str, workers: int = 0, address: str | None = None) -> LocalEngine | RayEngine:
    if name == "local":
        if address:
            raise UserError("--ray-address needs --engine ray")
        return LocalEngine(workers)
    if name == "ray":
        return RayEngine(workers, address)
    raise UserError(f"--engine must be one of {', '.join(ENGINES)}, not {name!r}")
