"""`dwm experiment RECIPE.toml`: the paper's comparisons as one grid of runs and one table.

A cell is (selection method, weighting, model preset, seed):
- selection: a `dwm select` manifest of the recipe's token budget, one per method and seed (`[selections]`:
  name = extra `dwm select` arguments; the method is the name unless the arguments say `--method`);
- weighting: `uniform`; `dwm` (a weighting model learned in that run); `transfer` (the weighting models learned by
  the `dwm` cell of the `transfer_from` selection, same model and seed, replayed: `weighting.mode = RUN_DIR`);
- model: a preset; `size_transfer = ["cpu-mini->cpu-small"]` adds, per seed, the learner's `dwm` cell on the
  `transfer_from` selection and the receiver's `uniform` and `transfer` cells there, the receiver replaying the
  learner's weighting models (a small model teaches a larger one);
- the oracle: `oracle = "books=1.0"` adds, per model and seed, a uniform cell trained on that static domain mixture
  of the whole prepared data at the same budget (the headroom: how much a better choice of data could gain here),
  compared against the uniform cell of `transfer_from`.

Cells run in order (learners before the cells that replay them), each trained with the recipe's `run_recipe` and
`overrides` (in this process, or through `launcher`, e.g. torchrun, as `dwm train` subprocesses), then evaluated
on the `heldout` target, the prepared data's `val` split and the lm-eval `tasks`. `jobs = N` trains N cells side
by side, each in its own process (a transfer cell starts once the cell it replays has finished); `threads` fixes
the torch threads of every cell, selection and evaluation, so a cell's numbers do not depend on how many ran
beside it (they reproduce bit for bit on the same machine at the same thread count, not across CPUs). The grid is
resumable: a cell whose `cell.json` exists is never rerun; a cell killed mid-run continues from its newest
checkpoint.

Writes OUT/cells.csv (one row per cell), OUT/results.csv and OUT/results.md (one row per selection x weighting x
model: every metric as mean ± standard error over seeds, the average of the accuracies, and the paired difference
against the uniform cell of the same selection and model).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dwm import config as C
from dwm.errors import UserError

RECIPES = Path(__file__).resolve().parent / "recipes" / "experiments"
WEIGHTINGS = ("uniform", "dwm", "transfer")


@dataclass
class ExperimentConfig:
    """A grid of runs (selection x weighting x model x seed) and how each is trained and evaluated."""

    out: str = "runs/experiment"
    """directory of the grid: selections/, one run directory per cell, cells.csv, results.csv, results.md"""
    data: str = "data/prepared"
    """prepared data directory (`dwm prepare`) every selection draws from"""
    reference: str = "data/target/reference.jsonl"
    """the weighting model's reference passages (weighting.reference) and dsir / quality classifier target"""
    heldout: str = "data/target/heldout.jsonl"
    """the target reported on (never seen by the weighting model)"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """seeds: paired across cells (same init and data order for every weighting of a selection)"""
    quick_seeds: list[int] = field(default_factory=lambda: [0])
    """seeds of `--quick`"""
    selections: dict[str, str] = field(default_factory=lambda: {"random": ""})
    """name = extra `dwm select` arguments (method = the name unless they give --method), e.g. quality = "--classifier\""""
    weightings: list[Literal["uniform", "dwm", "transfer"]] = field(default_factory=lambda: ["uniform", "dwm"])
    """weightings of every selection (transfer: replay the dwm cell of transfer_from)"""
    transfer_from: str = "random"
    """the selection whose learned weighting models `transfer` cells replay"""
    models: list[str] = field(default_factory=lambda: ["cpu-small"])
    """model presets of the grid"""
    size_transfer: list[str] = field(default_factory=list)
    """"LEARNER->RECEIVER" preset pairs: the receiver replays what the learner's DWM learned on transfer_from"""
    oracle: str = ""
    """a static domain mixture, domain=share pairs (the rest uniform over the other domains), e.g. "books=1.0" for
    a target of novels: adds an `oracle` uniform cell per model and seed on that mixture, at the same budget, whose
    difference against transfer_from's uniform cell is the headroom; empty: none"""
    run_recipe: str = "cpu-small-dwm"
    """`dwm train` recipe of every cell (a shipped name or a TOML path); uniform cells set weighting.mode=uniform"""
    steps: int = 80
    """LM steps per cell"""
    batch_tokens: int = 4096
    """global batch in tokens; each selection's budget is steps x batch_tokens"""
    overrides: list[str] = field(default_factory=list)
    """`dwm train` key=value overrides for every cell"""
    launcher: str = ""
    """empty: train in this process; else a command prefix whose cells run as `LAUNCHER -m dwm train ...`
    subprocesses, e.g. "torchrun --nproc_per_node 8\""""
    tasks: list[str] = field(default_factory=list)
    """lm-eval tasks per cell; NAME:K for K-shot (the paper reports 0- and few-shot)"""
    eval_device: str = "cpu"
    """device of the evaluation"""
    eval_batch_size: int = 16
    """batch size of the evaluation"""
    jobs: int = 1
    """cells trained side by side, each in its own process (the work of a cell is serial: on N cores, jobs = N with
    threads = 1 finishes a grid soonest); 1: one after another in this process"""
    threads: int = 0
    """torch threads of every cell (training, selection, evaluation), fixed for the whole grid (a launcher's
    subprocesses get it as OMP_NUM_THREADS); 0: torch's default (the cores of the machine). The numbers reproduce
    bit for bit only at the same thread count"""

    def validate(self, prefix: str = "") -> None:
        if not self.seeds or not self.quick_seeds:
            raise UserError(f"config key {prefix}seeds / quick_seeds: at least one seed")
        if not self.selections:
            raise UserError(f"config key {prefix}selections: at least one selection")
        if not self.weightings or not self.models:
            raise UserError(f"config keys {prefix}weightings and {prefix}models need at least one entry")
        if ("transfer" in self.weightings or self.size_transfer) and self.transfer_from not in self.selections:
            raise UserError(f"config key {prefix}transfer_from: {self.transfer_from!r} is not one of the selections"
                            f" ({', '.join(self.selections)}){C.did_you_mean(self.transfer_from, list(self.selections))}")
        if "oracle" in self.selections:
            raise UserError(f"config key {prefix}selections: the name 'oracle' is the grid's static-mixture cell"
                            f" (key oracle); name the selection otherwise")
        if self.oracle:
            from dwm.data.mixture import parse_shares

            parse_shares(self.oracle)
            if self.transfer_from not in self.selections:
                raise UserError(f"config key {prefix}transfer_from: {self.transfer_from!r} (the oracle's baseline) is"
                                f" not one of the selections ({', '.join(self.selections)})"
                                f"{C.did_you_mean(self.transfer_from, list(self.selections))}")
        for pair in self.size_transfer:
            if pair.count("->") != 1 or not all(pair.split("->")):
                raise UserError(f"config key {prefix}size_transfer: {pair!r} is not LEARNER->RECEIVER")
        C.check_positive(prefix + "steps", self.steps)
        C.check_positive(prefix + "batch_tokens", self.batch_tokens)
        C.check_positive(prefix + "jobs", self.jobs)
        if self.threads < 0:
            raise UserError(f"config key {prefix}threads: >= 0 (0: torch's default), got {self.threads}")


@dataclass
class Cell:
    selection: str
    weighting: str  # uniform | dwm | transfer (replays `source`)
    model: str
    seed: int
    source: str = ""  # the key of the dwm cell a transfer cell replays
    label: str = ""  # the row of the results table (size-transfer cells get their own)
    baseline: str = ""  # the selection whose uniform cell the paired difference is taken against (default: own)

    @property
    def key(self) -> str:
        return f"{self.selection}/{self.weighting}/{self.model}/s{self.seed}"

    @property
    def row(self) -> str:
        return self.label or f"{self.selection} | {self.weighting} | {self.model}"


def recipe_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".toml" or p.exists():
        return p
    shipped = sorted(x.stem for x in RECIPES.glob("*.toml"))
    if name not in shipped:
        raise UserError(f"experiment recipe {name!r}: not a file nor a shipped recipe ({', '.join(shipped)})"
                        f"{C.did_you_mean(name, shipped)}")
    return RECIPES / f"{name}.toml"


def load(name: str, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    cfg = C.load(ExperimentConfig, recipe_path(name), overrides, command="dwm experiment")
    C.validate(cfg)
    return cfg


def plan(cfg: ExperimentConfig, seeds: list[int]) -> list[Cell]:
    """Every cell in run order: per seed, the learners (dwm cells) before the transfer cells that replay them."""
    cells: list[Cell] = []
    for seed in seeds:
        for model in cfg.models:
            for sel in cfg.selections:
                cells += [Cell(sel, w, model, seed) for w in cfg.weightings if w != "transfer"]
            if "transfer" in cfg.weightings:
                src = Cell(cfg.transfer_from, "dwm", model, seed)
                cells += [Cell(sel, "transfer", model, seed, source=src.key) for sel in cfg.selections
                          if sel != cfg.transfer_from]
        for pair in cfg.size_transfer:
            learner, receiver = pair.split("->")
            src = Cell(cfg.transfer_from, "dwm", learner, seed)
            cells += [src, Cell(cfg.transfer_from, "uniform", receiver, seed),
                      Cell(cfg.transfer_from, "transfer", receiver, seed, source=src.key,
                           label=f"{cfg.transfer_from} | transfer from {learner} | {receiver}")]
        if cfg.oracle:
            cells += [Cell("oracle", "uniform", model, seed, label=f"oracle ({cfg.oracle}) | uniform | {model}",
                           baseline=cfg.transfer_from) for model in cfg.models]
    seen: set[str] = set()
    return [c for c in cells if not (c.key in seen or seen.add(c.key))]


# ---------------------------------------------------------------- running


def _selection(cfg: ExperimentConfig, out: Path, name: str, seed: int) -> Path:
    """The manifest of selection `name` at `seed` (made once); `oracle`: the static mixture of `cfg.oracle`."""
    path = out / "selections" / f"{name}-s{seed}.parquet"
    if path.is_file():
        return path
    if name == "oracle":
        from dwm.data.dataset import PreparedData
        from dwm.data.mixture import mixture_ids, parse_shares, write_manifest

        data = PreparedData(cfg.data, "train")
        ids = mixture_ids(data.domain_ids, data.domains, parse_shares(cfg.oracle),
                          cfg.steps * cfg.batch_tokens // data.seq_len, seed=seed)
        tmp = path.with_name(path.stem + ".tmp.parquet")
        write_manifest(ids, tmp)
        tmp.replace(path)
        return path
    from dwm.selection.cli import parse_options, select_documents

    # the recipe's extra `dwm select` arguments win over the grid's method, seed and target
    extra = parse_options(shlex.split(cfg.selections[name]), prog=f"dwm experiment: selections.{name}")
    options: dict[str, Any] = {"data": cfg.data, "method": name, "budget_tokens": cfg.steps * cfg.batch_tokens,
                               "seed": seed, "target": cfg.reference, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.parquet")
    select_documents(**{**options, "out": tmp})
    tmp.with_suffix(".json").replace(path.with_suffix(".json"))  # the report select writes beside the manifest
    tmp.replace(path)
    return path


def _train_overrides(cfg: ExperimentConfig, out: Path, cell: Cell, selection: Path) -> list:
    """The cell's overrides of the run recipe, in order: the grid's, the recipe's `overrides`, the weighting."""
    grid = {"data.dir": cfg.data, "data.selection": selection, "out": out / cell.key, "model.spec": cell.model,
            "train.seed": cell.seed, "train.max_steps": cfg.steps, "train.max_tokens": 0,
            "train.global_batch_tokens": cfg.batch_tokens, "weighting.reference": cfg.reference,
            "log.progress": False, "checkpoint.every": max(1, cfg.steps // 4)}
    mode = out / cell.source if cell.weighting == "transfer" else cell.weighting
    return [grid, *cfg.overrides, {"weighting.mode": mode}]


def _argv(overrides: list) -> list[str]:
    """Overrides as `dwm train` arguments (for a launcher's subprocess)."""
    out = []
    for item in overrides:
        if isinstance(item, str):
            out.append(item)
        else:
            out += [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in item.items()]
    return out


def train_cell(cfg: ExperimentConfig, out: Path, cell: Cell, callbacks=()) -> float:
    """Train one cell (resuming its newest checkpoint if a killed grid left one); returns the seconds it took."""
    from dwm.run import resolve_config_path

    selection = _selection(cfg, out, cell.selection, cell.seed)
    run = out / cell.key
    resume = (run / "checkpoints" / "LATEST").is_file()
    recipe = resolve_config_path(cfg.run_recipe, None, False)
    ov = _train_overrides(cfg, out, cell, selection)
    t0 = time.perf_counter()
    if cfg.launcher:
        cmd = [*shlex.split(cfg.launcher), "-m", "dwm", "train", "--config", str(recipe),
               *(["--resume"] if resume else []), *_argv(ov)]
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)} if cfg.threads else None
        if subprocess.run(cmd, check=False, env=env).returncode != 0:
            raise UserError(f"cell {cell.key}: `{shlex.join(cmd)}` failed")
    else:
        from dwm.run import train

        train(recipe, overrides=ov, resume=resume, callbacks=callbacks)
    return time.perf_counter() - t0


def metrics_of(ev: dict[str, Any]) -> dict[str, float]:
    """The flat metrics of one eval.json: LAMBADA-style accuracy, perplexity and passage loss on the heldout
    target, the val split's loss (all and per domain), every lm-eval task's accuracy."""
    m: dict[str, float] = {}
    lam = ev.get("lambada")
    if lam:
        m["lambada_acc"] = lam["acc"]
        m["lambada_ppl"] = lam["perplexity"]
        m["passage_loss"] = lam["passage_loss"]
    held = ev.get("heldout", {})
    if "overall" in held:
        m["val_loss"] = held["overall"]["loss"]
        m.update({f"val_loss/{d}": r["loss"] for d, r in sorted(held.get("per_domain", {}).items())})
    for task, r in sorted(ev.get("harness", {}).items()):
        for metric in ("acc", "acc_norm"):
            if metric in r:
                m[f"{task}/{metric}"] = r[metric]
    accs = [v for k, v in m.items() if k == "lambada_acc" or k.endswith("/acc")]
    if accs:
        m["avg_acc"] = statistics.fmean(accs)
    return m


def run_cell(cfg: ExperimentConfig, out: Path, cell: Cell, callbacks=()) -> dict[str, Any]:
    """Train and evaluate a cell unless its cell.json exists; returns that record."""
    done = out / cell.key / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    seconds = train_cell(cfg, out, cell, callbacks)
    from dwm.eval.cli import evaluate

    ev = evaluate(out / cell.key, data=cfg.data, target=cfg.heldout, tasks=cfg.tasks,
                  batch_size=cfg.eval_batch_size, device=cfg.eval_device)
    rec = {"cell": cell.key, "row": cell.row, "selection": cell.selection, "weighting": cell.weighting,
           "model": cell.model, "seed": cell.seed, "source": cell.source, "baseline": cell.baseline or cell.selection,
           "train_seconds": round(seconds, 1),
           "metrics": metrics_of(ev)}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(done)  # atomic: a cell is finished or not
    return rec


def _pool_cell(cfg: ExperimentConfig, out: Path, cell: Cell) -> dict[str, Any]:
    """A cell in a worker process of `jobs > 1`, at the grid's thread count."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return run_cell(cfg, out, cell)


def _side_by_side(cfg: ExperimentConfig, out: Path, todo: list[Cell], done: set[str], log) -> dict[str, dict]:
    """Train and evaluate `todo`, `cfg.jobs` at a time in worker processes, in plan order except that a transfer
    cell waits for the cell it replays. Selections are made here, one at a time, before the cells that use them."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from dwm.host import die_with_parent

    records: dict[str, dict] = {}
    pending, running = list(todo), {}
    with ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("spawn"), initializer=die_with_parent) as pool:
        while pending or running:
            for cell in [c for c in pending if not c.source or c.source in done]:
                if len(running) >= cfg.jobs:
                    break
                _selection(cfg, out, cell.selection, cell.seed)
                running[pool.submit(_pool_cell, cfg, out, cell)] = (cell, time.perf_counter())
                pending.remove(cell)
                log(f"{cell.key}: running")
            if not running:  # only cells whose learner is not in this grid: cannot happen with plan()'s cells
                raise UserError(f"cells {', '.join(c.key for c in pending)} replay cells that never run")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                cell, t0 = running.pop(f)
                records[cell.key] = f.result()
                done.add(cell.key)
                m = records[cell.key]["metrics"]
                log(f"{cell.key}: {time.perf_counter() - t0:.0f} s, heldout passage loss "
                    f"{m.get('passage_loss', float('nan')):.4f}, acc {m.get('lambada_acc', float('nan')):.4f}")
    return records


def run_experiment(cfg: ExperimentConfig, quick: bool = False, callbacks=(), log=print) -> list[dict[str, Any]]:
    """Run every cell not finished yet (in this process, or `cfg.jobs` at a time in worker processes, which take no
    `callbacks`), write the tables, and return one record per cell in plan order."""
    import torch

    if cfg.jobs > 1 and callbacks:
        raise UserError("experiment callbacks run in this process: jobs must be 1")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.toml").write_text(C.to_toml(cfg, "resolved dwm experiment configuration"))
    cells = plan(cfg, cfg.quick_seeds if quick else cfg.seeds)
    done = {c.key for c in cells if (out / c.key / "cell.json").is_file()}
    todo = [c for c in cells if c.key not in done]
    log(f"dwm experiment: {len(cells)} cell{'s' * (len(cells) != 1)}, {len(done)} finished before, {len(todo)} to run"
        + (f", {cfg.jobs} at a time" if cfg.jobs > 1 and todo else "")
        + (f", {cfg.threads} torch thread{'s' * (cfg.threads > 1)} each" if cfg.threads else ""))
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.jobs > 1 and todo:
            new = _side_by_side(cfg, out, todo, done, lambda s: log(f"[{len(done)}/{len(cells)} done] {s}"))
        else:
            new = {}
            for i, cell in enumerate(todo, 1):  # a cell trains for minutes: say which one runs now
                log(f"[{i}/{len(todo)}] {cell.key}: running")
                t0 = time.perf_counter()
                new[cell.key] = m = run_cell(cfg, out, cell, callbacks)
                log(f"[{i}/{len(todo)}] {cell.key}: {time.perf_counter() - t0:.0f} s, heldout passage loss "
                    f"{m['metrics'].get('passage_loss', float('nan')):.4f}, "
                    f"acc {m['metrics'].get('lambada_acc', float('nan')):.4f}")
    finally:
        torch.set_num_threads(threads)
    records = [new.get(c.key) or json.loads((out / c.key / "cell.json").read_text()) for c in cells]
    write_results(out, records)
    return records


# ---------------------------------------------------------------- tables


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (nan with one seed)."""
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per selection x weighting x model: mean and s.e. of every metric over seeds, and the paired
    difference against the uniform cell of the same selection (the oracle: of its baseline) and model, same seed."""
    rows: dict[str, list[dict]] = {}
    for r in records:
        rows.setdefault(r["row"], []).append(r)
    uniform = {(r["selection"], r["model"], r["seed"]): r for r in records if r["weighting"] == "uniform"}
    out = []
    for row, rs in rows.items():
        keys = list(dict.fromkeys(k for r in rs for k in r["metrics"]))
        s: dict[str, Any] = {"row": row, "selection": rs[0]["selection"], "weighting": rs[0]["weighting"],
                             "model": rs[0]["model"], "seeds": [r["seed"] for r in rs]}
        for k in keys:
            vals = [r["metrics"][k] for r in rs if k in r["metrics"]]
            s[k], s[k + " se"] = mean_se(vals)
        if rs[0]["weighting"] != "uniform" or rs[0].get("baseline", rs[0]["selection"]) != rs[0]["selection"]:
            base = [uniform.get((r.get("baseline", r["selection"]), r["model"], r["seed"])) for r in rs]
            for k in ("passage_loss", "avg_acc"):
                d = [r["metrics"][k] - b["metrics"][k] for r, b in zip(rs, base, strict=True)
                     if b is not None and k in r["metrics"] and k in b["metrics"]]
                if d:
                    s[f"{k} - uniform"], s[f"{k} - uniform se"] = mean_se(d)
        out.append(s)
    return out


def _cell(v: float, se: float, digits: int = 4) -> str:
    return f"{v:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def write_results(out: Path, records: list[dict[str, Any]]) -> None:
    if not records:
        return
    keys = list(dict.fromkeys(k for r in records for k in r["metrics"]))
    with open(out / "cells.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", "selection", "weighting", "model", "seed", "train_seconds", *keys])
        for r in records:
            w.writerow([r["cell"], r["selection"], r["weighting"], r["model"], r["seed"], r["train_seconds"],
                        *(r["metrics"].get(k, "") for k in keys)])
    summary = summarise(records)
    cols = list(dict.fromkeys(k for s in summary for k in s if k not in ("row", "selection", "weighting", "model",
                                                                            "seeds")))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["selection", "weighting", "model", "n_seeds", *cols])
        for s in summary:
            w.writerow([s["selection"], s["row"].split(" | ")[1], s["model"], len(s["seeds"]),
                        *(s.get(k, "") for k in cols)])
    main = [k for k in ("lambada_acc", "lambada_ppl", "passage_loss", "val_loss") if k in keys]
    tasks = [k for k in keys if "/acc" in k]
    diffs = ["passage_loss - uniform", "avg_acc - uniform"]
    head = [*main, *tasks, *(["avg_acc"] if "avg_acc" in keys else []), *diffs]
    lines = [f"# {out.name}: {len(records)} cells, mean ± s.e. over seeds", "",
             "| selection | weighting | model | seeds | " + " | ".join(head) + " |",
             "|---|---|---|---|" + "---|" * len(head)]
    for s in summary:
        vals = [(_cell(s[k], s[k + " se"], 1 if k == "lambada_ppl" else 4) if k in s else "") for k in head]
        lines.append(f"| {s['row']} | {len(s['seeds'])} | " + " | ".join(vals) + " |")
    doms = [k for k in keys if k.startswith("val_loss/")]
    if doms:
        lines += ["", "held-out (val split) loss per domain, mean over seeds:", "",
                  "| selection | weighting | model | " + " | ".join(d.split("/", 1)[1] for d in doms) + " |",
                  "|---|---|---|" + "---|" * len(doms)]
        for s in summary:
            lines.append(f"| {s['row']} | " + " | ".join(f"{s[d]:.4f}" if d in s else "" for d in doms) + " |")
    lines += ["", ("`passage_loss` and `lambada_*` are on the heldout target; `... - uniform` is the paired difference "
                   "against the uniform cell of the same selection and model (the oracle's: against its baseline "
                   "selection's), mean ± s.e. over seeds.")]
    (out / "results.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- `dwm experiment`


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="experiment TOML, or a shipped recipe name (cpu-mini, paper-370m, "
                                             "paper-1.3b) (default: none, print --help-config)")
    p.add_argument("--quick", action="store_true", help="only the recipe's quick_seeds (one seed: a first look)")
    p.add_argument("--dry-run", action="store_true", help="print the cells in run order and exit")
    p.add_argument("--help-config", action="store_true", help="print every experiment key, its type and default")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the recipe, e.g. seeds=0,1")


def run(args: argparse.Namespace) -> int:
    if args.help_config or not args.recipe:
        print(C.help_text(ExperimentConfig))
        return 0
    cfg = load(args.recipe, args.overrides)
    if args.dry_run:
        for c in plan(cfg, cfg.quick_seeds if args.quick else cfg.seeds):
            print(c.key + (f"  (replays {c.source})" if c.source else ""))
        return 0
    if not (Path(cfg.data) / "meta.json").is_file():
        raise UserError(f"prepared data directory not found: {cfg.data} (`make demo` prepares runs/demo/data; "
                        f"or `dwm prepare CORPUS --out DIR` and data=DIR)")
    for p in (cfg.reference, cfg.heldout):
        if not Path(p).is_file():
            raise UserError(f"target file not found: {p} (build it with `dwm target build`)")
    run_experiment(cfg, quick=args.quick, log=lambda s: print(s, file=sys.stderr, flush=True))
    print((Path(cfg.out) / "results.md").read_text())
    return 0
