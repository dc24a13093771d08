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
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dwm.errors import UserError

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
            return [fn(x) for x in items]
        with mp.get_context("fork").Pool(min(self.workers, len(items))) as pool:
            return list(pool.imap(fn, items, chunksize=1))

    def close(self) -> None:
        pass


def _ray_task(row: dict[str, Any]) -> dict[str, Any]:
    fn, item = pickle.loads(row["task"])
    return {"i": row["i"], "out": pickle.dumps(fn(item))}


class RayEngine:
    """Ray Data: one task per shard (`map` over a dataset of shard specs), results gathered on the driver."""

    name = "ray"
    shared_disk = False  # a cluster's tasks may run anywhere

    def __init__(self, workers: int = 0, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("--engine ray needs Ray Data: pip install 'dwm-llm[ray]' (or 'ray[data]')") from None
        self.ray = ray
        self.workers = workers or default_workers()
        self.started = False
        if not ray.is_initialized():
            src = str(Path(__file__).resolve().parents[2])  # so that workers import this dwm
            env = {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p),
                   "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
            kw: dict[str, Any] = {"address": address} if address else {"num_cpus": self.workers}
            try:
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                         runtime_env={"env_vars": env}, **kw)
            except Exception as e:  # a bad address, no cluster there
                raise UserError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {e}") from e
            self.started = True

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        rows = [{"i": i, "task": pickle.dumps((fn, item))} for i, item in enumerate(items)]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows))).map(_ray_task)
        out = sorted(ds.take_all(), key=lambda r: r["i"])
        return [pickle.loads(r["out"]) for r in out]

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False


def make_engine(name: str, workers: int = 0, address: str | None = None) -> LocalEngine | RayEngine:
    if name == "local":
        if address:
            raise UserError("--ray-address needs --engine ray")
        return LocalEngine(workers)
    if name == "ray":
        return RayEngine(workers, address)
    raise UserError(f"--engine must be one of {', '.join(ENGINES)}, not {name!r}")
