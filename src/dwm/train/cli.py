"""`dwm train`: train a LLaMA-style LM on a prepared directory, uniform or with a data weighting model.

Launch with torchrun for DDP (`torchrun --nproc_per_node N -m dwm.cli train ...`); the same command runs on one
process. `--data`, `--selection`, `--out`, `--weighting` and `--keep-learning` are shortcuts for the dotted keys
data.dir, data.selection, out, weighting.mode and weighting.keep_learning; trailing `key=value` arguments
override anything (see `--help-config`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dwm.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config or a shipped recipe name (e.g. cpu-small-dwm); with --resume and "
                                    "no --config, RUN_DIR/config.toml is used")
    p.add_argument("--data", help="prepared data directory (data.dir)")
    p.add_argument("--selection", help="parquet manifest with sample_id: restricts and orders the data (data.selection)")
    p.add_argument("--out", help="run directory (out)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's newest good checkpoint")
    p.add_argument("--weighting", metavar="MODE_OR_RUN_DIR",
                   help="'uniform', 'dwm', or a run directory whose weighting models to replay (weighting.mode)")
    p.add_argument("--keep-learning", action="store_true",
                   help="with --weighting RUN_DIR: keep updating the replayed model (weighting.keep_learning)")
    p.add_argument("--help-config", action="store_true", help="print every config key, its type, default and doc")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. optim.lr=3e-4")


def resolve_config_path(arg: str | None, out: str | None, resume: bool) -> Path | None:
    from dwm.train.config import recipe_path

    if arg:
        p = Path(arg)
        if p.is_file():
            return p
        rp = recipe_path(arg.removesuffix(".toml"))
        if rp.is_file():
            return rp
        raise UserError(f"config {arg} does not exist (nor is it a shipped recipe)")
    if resume and out and (Path(out) / "config.toml").is_file():
        return Path(out) / "config.toml"
    return None


def run(args: argparse.Namespace) -> int:
    from dwm.train.config import help_config, load_config

    if args.help_config:
        print(help_config())
        return 0
    shortcuts = []
    for flag, key in (("data", "data.dir"), ("selection", "data.selection"), ("out", "out"),
                      ("weighting", "weighting.mode")):
        if getattr(args, flag) is not None:
            shortcuts.append(f"{key}={getattr(args, flag)}")
    if args.keep_learning:
        shortcuts.append("weighting.keep_learning=true")
    path = resolve_config_path(args.config, args.out, args.resume)
    if path is None and not args.overrides and not shortcuts:
        raise UserError("no configuration: give --config FILE (or a recipe name) and/or key=value overrides")
    cfg = load_config(path, [*shortcuts, *args.overrides])

    from dwm.train.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume)
    final = trainer.train()
    if trainer.is_main and final:
        print(f"done: step {final['step']}, loss {final['loss']:.4f}, run dir {trainer.run_dir}", file=sys.stderr)
    return 0
