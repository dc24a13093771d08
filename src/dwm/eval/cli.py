"""`dwm eval RUN_DIR`: held-out loss/perplexity per domain + LAMBADA accuracy/perplexity (+ optional lm-eval tasks).

Results go to RUN_DIR/eval.json and a table on stdout. `evaluate` (`dwm.evaluate`) is the library entry point;
`format_table` prints several runs side by side (the demo compares uniform vs DWM with it).

The `reference` target set is what the weighting model optimised against, so reporting on it would flatter DWM:
it is refused unless --allow-reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dwm.errors import UserError
from dwm.eval.export import export_run, load_run_model, load_run_tokenizer, resolve_checkpoint
from dwm.host import keep_freed_memory
from dwm.metrics import read_metrics
from dwm.rundir import RunDir, RunSettings

DEFAULT_TARGET = "data/target/heldout.jsonl"


def _step_and_tokens(run_dir: Path, ckpt_name: str, cfg: RunSettings) -> tuple[int | None, int | None]:
    """Training step of a checkpoint (from its name) and tokens seen by then: the metrics.jsonl record of that
    step if it has a token count, else step * train.global_batch_tokens. trainer_state.pt is not read: it holds
    the optimizer state, twice the model's size."""
    m = re.fullmatch(r"step_(\d+)", ckpt_name)
    step = int(m.group(1)) if m else None
    if step is None:
        return None, None
    found = None
    for rec in read_metrics(RunDir(run_dir).metrics):  # skips a torn last line of a killed run
        if rec.get("step") == step:
            for key in ("tokens_seen", "tokens"):
                if isinstance(rec.get(key), int):
                    found = rec[key]
    if found is not None:
        return step, found
    gbt = cfg.global_batch_tokens
    return step, step * gbt if gbt is not None else None


def _is_reference(target: Path, cfg: RunSettings) -> bool:
    ref = cfg.reference
    if ref and Path(ref).resolve() == target.resolve():
        return True
    return target.stem == "reference"


def evaluate_run(run_dir: str | Path, data_dir: str | Path | None = None, target: str | Path | None = DEFAULT_TARGET,
                 checkpoint: str | None = None, tasks: list[str] | None = None, batch_size: int = 16,
                 max_passages: int | None = None, max_samples: int | None = None, allow_reference: bool = False,
                 device: str = "cpu", write: bool = True, task_include: list[str] | None = None) -> dict[str, Any]:
    """Evaluate one checkpoint of a run; writes RUN_DIR/eval.json (if `write`) and returns the same dict.

    data_dir defaults to the run's `data.dir`; target None skips LAMBADA; tasks are lm-eval task names run on a
    temporary export of the checkpoint (dwm's local tasks, e.g. `dwm_lambada`, read `target`; task_include adds
    directories of the user's own lm-eval task YAMLs).
    """
    import torch

    run = Path(run_dir)
    ckpt, name = resolve_checkpoint(run, checkpoint)
    cfg = RunDir(run).settings()
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if max_passages is not None and max_passages < 1:
        raise UserError(f"--max-passages must be >= 1, got {max_passages}")
    target_path = Path(target) if target is not None else None
    if target_path is not None:
        if not target_path.is_file():
            raise UserError(f"target file not found: {target_path} (build it with `dwm target build`)")
        if _is_reference(target_path, cfg) and not allow_reference:
            raise UserError(f"{target_path} is the reference set the weighting model optimised against; "
                            "report on the heldout set (or pass --allow-reference)")
    if data_dir is None:
        data_dir = cfg.data_dir
        if data_dir is None:
            raise UserError(f"{run / 'config.toml'} names no data.dir: pass --data")
    data_path = Path(data_dir)
    if not (data_path / "meta.json").is_file():
        raise UserError(f"prepared data directory not found: {data_path} (pass --data DIR)")
    if (run / "tokenizer.json").is_file() and (data_path / "tokenizer.json").is_file():
        from dwm.data.tokenizer import check_same_tokenizer

        check_same_tokenizer(run / "tokenizer.json", data_path / "tokenizer.json",
                             f"the run {run} and the data {data_path}")

    shots: dict[int | None, list[str]] = {}
    for t in tasks or ():  # "name" (the task's default shots) or "name:k" (k-shot), checked before any loading
        name_, _, k = t.partition(":")
        if k and not k.isdigit():
            raise UserError(f"task {t!r}: the shot count after ':' must be a whole number (e.g. {name_}:5)")
        shots.setdefault(int(k) if k else None, []).append(name_)

    step, tokens_seen = _step_and_tokens(run, name, cfg)
    if device == "cpu":
        keep_freed_memory()  # the logits of a 16-sample batch are 134 MB: reuse them (dwm.host)
    model = load_run_model(ckpt, device=device)
    tokenizer = load_run_tokenizer(run)
    result: dict[str, Any] = {
        "run_dir": str(run), "checkpoint": name, "step": step, "tokens_seen": tokens_seen,
        "model_dir": str(ckpt / "model"), "data_dir": str(data_path),
    }
    from dwm.eval.heldout import heldout_eval

    result["heldout"] = heldout_eval(model, data_path, batch_size=batch_size, max_samples=max_samples)
    if "skipped" in result["heldout"]:
        print(f"dwm eval: held-out loss skipped: {result['heldout']['skipped']}", file=sys.stderr)
    else:
        _warn_few_val_domains(result["heldout"], data_path)
    if target_path is not None:
        from dwm.eval.lambada import lambada_eval, passage_loss

        lam = lambada_eval(model, tokenizer, target_path, batch_size=batch_size, max_passages=max_passages)
        lam["passage_loss"] = passage_loss(model, tokenizer, target_path, batch_size, max_passages)
        result["lambada"] = {**lam, "target": str(target_path)}
    if tasks:
        from dwm.eval.harness import run_harness

        result["harness"] = {}
        with tempfile.TemporaryDirectory(prefix="dwm_export_") as tmp:
            export_run(run, tmp, name)
            if not sys.stderr.isatty():  # lm-eval's request bars: one update per 30 s in a log, not hundreds
                os.environ.setdefault("TQDM_MININTERVAL", "30")
            for k, names in shots.items():
                t_h = time.perf_counter()
                print(f"dwm eval: lm-eval {', '.join(names)}{'' if k is None else f' ({k}-shot)'} ...",
                      file=sys.stderr, flush=True)
                res = run_harness(tmp, names, target=target_path, batch_size=batch_size, device=device,
                                  limit=max_passages, include_path=task_include or (), num_fewshot=k)["results"]
                result["harness"].update({(t if k is None else f"{t}:{k}"): r for t, r in res.items()})
                print(f"dwm eval: lm-eval {', '.join(names)} done in {time.perf_counter() - t_h:.0f}s",
                      file=sys.stderr, flush=True)
    del model
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if write:
        (run / "eval.json").write_text(json.dumps(result, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    return result


def _warn_few_val_domains(held: dict[str, Any], data_path: Path) -> None:
    """One warning line when the val split's rows cover fewer than half of the data's domains."""
    from dwm.data.dataset import read_meta

    domains = read_meta(data_path).get("domains") or []
    seen = sorted(held.get("per_domain", {}))
    if domains and 2 * len(seen) < len(domains):
        print(f"dwm eval: warning: the val split covers only {len(seen)} of {len(domains)} domains "
              f"({', '.join(seen)}): the val loss says nothing of the others (re-prepare with a larger "
              "--val-fraction)", file=sys.stderr)


class EvalResult(dict):
    """What `evaluate` (`dwm.evaluate`) returns: the eval.json dict (`run_dir`, `checkpoint`, `step`,
    `tokens_seen`, `heldout`, `lambada`, `harness`), with its headline numbers as properties (None when not
    measured)."""

    def _get(self, section: str, key: str) -> Any:
        return (self.get(section) or {}).get(key)

    @property
    def lambada_acc(self) -> float | None:
        return self._get("lambada", "acc")

    @property
    def lambada_perplexity(self) -> float | None:
        return self._get("lambada", "perplexity")

    @property
    def passage_loss(self) -> float | None:
        """Mean NLL of the target passages (what the weighting model optimises against the reference set)."""
        return self._get("lambada", "passage_loss")

    @property
    def val_loss(self) -> float | None:
        """Held-out loss of the prepared data's val split, all domains."""
        return (self._get("heldout", "overall") or {}).get("loss")


def evaluate(run: str | Path, *, data: str | Path | None = None, target: str | Path | None = DEFAULT_TARGET,
             tasks: Sequence[str] = (), checkpoint: str | None = None, batch_size: int = 16,
             max_passages: int | None = None, max_samples: int | None = None, allow_reference: bool = False,
             device: str | None = None, write: bool = True, task_include: Sequence[str | Path] = ()) -> EvalResult:
    """`dwm eval` as a function: evaluate a run's checkpoint (default checkpoints/LATEST) on the held-out domains
    of `data` (default: the run's data.dir), the LAMBADA-format `target` (None skips it; the reference set the
    weighting model optimised against is refused unless allow_reference) and lm-eval `tasks` ("name" or "name:k"
    for k-shot; task_include adds directories of task YAMLs). device None: cuda if available, else cpu. Writes
    RUN_DIR/eval.json when `write`; returns the same as an EvalResult. Bad input raises UserError."""
    if not device:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    res = evaluate_run(run, data_dir=data, target=target, checkpoint=checkpoint,
                       tasks=[t for t in tasks if t.strip()] or None, batch_size=batch_size,
                       max_passages=max_passages, max_samples=max_samples, allow_reference=allow_reference,
                       device=device, write=write, task_include=[str(d) for d in task_include] or None)
    return EvalResult(res)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def table_rows(res: dict[str, Any]) -> dict[str, Any]:
    """{row label: value} of one eval result, in display order."""
    rows: dict[str, Any] = {"checkpoint": res.get("checkpoint"), "tokens seen": res.get("tokens_seen")}
    held = res.get("heldout", {})
    if "skipped" in held:
        rows["val loss [all]"] = "skipped (empty split)"
    for dom, r in held.get("per_domain", {}).items():
        rows[f"val loss [{dom}]"] = r["loss"]
    if "overall" in held:
        rows["val loss [all]"] = held["overall"]["loss"]
        rows["val ppl [all]"] = held["overall"]["perplexity"]
    if "lambada" in res:
        lam = res["lambada"]
        rows["LAMBADA acc"] = lam["acc"]
        rows["LAMBADA ppl"] = lam["perplexity"]
        if "passage_loss" in lam:
            rows["LAMBADA passage loss"] = lam["passage_loss"]
        rows["LAMBADA n"] = lam["n"]
    for task, metrics in res.get("harness", {}).items():
        for k in ("acc", "perplexity"):
            if k in metrics:
                rows[f"{task} {k}"] = metrics[k]
    return rows


def format_table(results_by_name: dict[str, dict[str, Any]]) -> str:
    """Runs as columns, metrics as rows (union of every run's rows; '-' where a run lacks one)."""
    per_run = {name: table_rows(r) for name, r in results_by_name.items()}
    labels: list[str] = []
    for rows in per_run.values():
        labels += [k for k in rows if k not in labels]
    cells = [[label] + [_fmt(rows.get(label)) for rows in per_run.values()] for label in labels]
    header = ["metric", *per_run]
    widths = [max(len(str(row[i])) for row in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run directory (dwm train --out)")
    p.add_argument("--data", default=None, help="prepared data dir for held-out loss (default: the run's data.dir)")
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"LAMBADA-format JSONL to report (default: {DEFAULT_TARGET}); 'none' to skip")
    p.add_argument("--checkpoint", default=None, help="checkpoint name (default: checkpoints/LATEST)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks run on an export of the checkpoint (dwm_lambada is offline); "
                        "NAME:K runs a task K-shot, e.g. hellaswag:0,hellaswag:5")
    p.add_argument("--task-include", action="append", default=None, metavar="DIR",
                   help="directory of extra lm-eval task YAMLs for --tasks (repeatable)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--max-passages", type=int, default=None, help="evaluate only the first N target passages")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N held-out rows")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--allow-reference", action="store_true",
                   help="allow reporting on the reference set the weighting model optimised against")


def run(args: argparse.Namespace) -> int:
    target = None if str(args.target).lower() == "none" else args.target
    res = evaluate(args.run_dir, data=args.data, target=target, checkpoint=args.checkpoint,
                   tasks=args.tasks.split(",") if args.tasks else (), batch_size=args.batch_size,
                   max_passages=args.max_passages, max_samples=args.max_samples,
                   allow_reference=args.allow_reference, device=args.device, task_include=args.task_include or ())
    print(format_table({Path(args.run_dir).name or str(args.run_dir): res}))
    print(f"wrote {Path(args.run_dir) / 'eval.json'}", file=sys.stderr)
    return 0
