"""lm-evaluation-harness on an exported model, fully offline for dwm's own tasks.

dwm's tasks (src/dwm/eval/tasks/*.yaml, e.g. `dwm_lambada`) are lm-eval's `lambada_openai` with
`dataset_path: json`. The shipped YAMLs name no file: `local_task_dir` copies them into a temporary include
directory with `dataset_kwargs.data_files.test` set to the resolved target path, so the same task runs on
data/target/heldout.jsonl, a real lambada_openai JSONL, or a test file. Any other task name is handed to
lm-eval unchanged; it may need the dataset hub, and failing to load offline is a UserError, not a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from dwm.errors import UserError


def local_task_names() -> list[str]:
    """Names of the task YAMLs shipped in dwm/eval/tasks (the file stem is the task name)."""
    root = resources.files("dwm.eval") / "tasks"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


@contextlib.contextmanager
def local_task_dir(target: str | Path) -> Iterator[Path]:
    """A temporary lm-eval include dir holding dwm's task YAMLs bound to `target` (a LAMBADA JSONL)."""
    import yaml

    target = Path(target).resolve()
    if not target.is_file():
        raise UserError(f"target file not found: {target}")
    root = resources.files("dwm.eval") / "tasks"
    with tempfile.TemporaryDirectory(prefix="dwm_tasks_") as tmp:
        for name in local_task_names():
            cfg = yaml.safe_load((root / f"{name}.yaml").read_text(encoding="utf-8"))
            cfg["dataset_kwargs"] = {"data_files": {cfg.get("test_split", "test"): str(target)}}
            (Path(tmp) / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        yield Path(tmp)


def _clean_metrics(res: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's {"acc,none": x, "alias": ...} -> {"acc": x}; non-numeric entries (alias, "N/A") dropped."""
    out = {}
    for k, v in res.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k.split(",")[0]] = float(v)
    return out


def run_harness(model_dir: str | Path, tasks: Sequence[str], target: str | Path | None = None,
                batch_size: int = 16, device: str = "cpu", limit: int | None = None,
                log_samples: bool = False, include_path: Sequence[str | Path] = (),
                include_defaults: bool | None = None, num_fewshot: int | None = None) -> dict[str, Any]:
    """`lm_eval.simple_evaluate(model="hf", model_args=pretrained=model_dir, ...)` on `tasks`.

    Returns {"results": {task: {metric: value}}, "samples": raw lm-eval samples (only if log_samples)}.
    dwm's local tasks need `target`; other names are looked up in the YAML dirs of `include_path`, then in
    lm-eval's own registry (indexing it takes 10-30 s, so only when needed, unless include_defaults says).
    num_fewshot: examples in each prompt (None: each task's own default, zero for most).
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-eval is not installed: pip install 'dwm-llm[eval]'") from None
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty")
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"not a Hugging Face model directory (no config.json): {model_dir}")
    local = set(local_task_names())
    wanted_local = [t for t in tasks if t in local]
    if wanted_local and target is None:
        raise UserError(f"task(s) {', '.join(wanted_local)} need a target file (--target)")
    external = [t for t in tasks if t not in local]

    with contextlib.ExitStack() as stack:
        include = stack.enter_context(local_task_dir(target)) if wanted_local else None
        paths = [str(p) for p in include_path] + ([str(include)] if include else [])
        for p in include_path:
            if not Path(p).is_dir():
                raise UserError(f"task include path is not a directory: {p}")
        tm = TaskManager(include_path=paths or None, include_defaults=bool(include_defaults))
        if include_defaults is None and any(t not in tm.all_tasks for t in external):
            # only now pay for indexing lm-eval's few thousand built-in tasks
            tm = TaskManager(include_path=paths or None, include_defaults=True)
        unknown = [t for t in external if t not in tm.all_tasks]
        if unknown:
            raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} "
                            f"(dwm's local tasks: {', '.join(sorted(local))})")
        # lm-eval logs a page of INFO per run; keep the CLI's output readable.
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        try:
            out = lm_eval.simple_evaluate(
                model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
                tasks=list(tasks), batch_size=batch_size, device=device, limit=limit, task_manager=tm,
                log_samples=log_samples, bootstrap_iters=1000, num_fewshot=num_fewshot)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 -- hub task offline, bad dataset file...: one line for the user
            if external:
                hint = (f" (task(s) {', '.join(external)} may need the dataset hub, which is offline here; "
                        f"dwm's offline tasks: {', '.join(sorted(local))})")
            else:
                hint = ""
            raise UserError(f"lm-eval failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            f"{hint}") from None
    if out is None:  # non-zero rank in a distributed lm-eval run
        return {"results": {}}
    result: dict[str, Any] = {"results": {t: _clean_metrics(r) for t, r in out["results"].items()}}
    if log_samples:
        result["samples"] = out.get("samples", {})
    return result
