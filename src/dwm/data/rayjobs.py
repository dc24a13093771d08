"""Ray Data as the scale-out engine of `dwm prepare --engine ray` and `dwm select --engine ray`: start (or join) a
Ray instance, and map a top-level function over a list of small task descriptions as Ray Data tasks, one per item,
with the results back in item order. No scheduler of dwm's own: placement, retries and cluster membership are Ray's.

On a cluster (an address), every node must see the input / prepared paths at the same place (a shared file
system) and have dwm installed. Ray is an optional dependency (`pip install 'dwm-llm[ray]'`).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dwm.errors import UserError


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError("--engine ray needs Ray Data: pip install 'dwm-llm[ray]' (or 'ray[data]')") from None
    return ray


def start(workers: int, address: str | None = None) -> bool:
    """Start a local Ray instance with `workers` CPUs, or connect to `address`; False if Ray was already up."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    src = str(Path(__file__).resolve().parents[2])  # so that the workers import this dwm
    env = {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p),
           "TOKENIZERS_PARALLELISM": "false"}
    if address:  # a cluster's workers get the environment through Ray
        kw: dict[str, Any] = {"address": address, "runtime_env": {"env_vars": env}}
    else:  # a local instance's workers inherit this process's environment (no runtime-env setup)
        os.environ.update(env)
        kw = {"num_cpus": workers}
    try:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
    except Exception as e:  # a bad address, no cluster there
        raise UserError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {e}") from e
    return True


def stop() -> None:
    _import_ray().shutdown()


def _task(row: dict[str, Any]) -> dict[str, Any]:
    fn, item = pickle.loads(row["task"])
    return {"i": row["i"], "out": pickle.dumps(fn(item))}


def imap(fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
    """fn(item) for each item, as Ray Data tasks (one block per item), yielded in item order."""
    ray = _import_ray()
    if not items:
        return
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    rows = [{"i": i, "task": pickle.dumps((fn, item))} for i, item in enumerate(items)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(_task)
    for row in ds.iter_rows():
        yield pickle.loads(row["out"])
