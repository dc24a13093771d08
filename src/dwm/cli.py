"""The `dwm` command. Each subcommand lives in the module that does its work; that module exposes
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only for the subcommand invoked,
so `dwm prepare` does not pay for importing transformers."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from dwm.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "corpus": ("dwm.tools", "rebuild the shipped multi-domain corpus from package registries (maintainers)"),
    "target": ("dwm.data.target", "build LAMBADA-style reference/heldout target sets from held-out novels"),
    "prepare": ("dwm.data.prepare", "tokenize documents into fixed-length samples (memmap + parquet)"),
    "select": ("dwm.selection.cli", "select a token budget of documents: a manifest for `dwm train --selection`"),
    "train": ("dwm.run", "train a LLaMA-style LM, uniform or with a data weighting model"),
    "plan": ("dwm.plan", "parameters, FLOPs, peak memory per GPU and GPU-hours of a recipe, before step 0"),
    "eval": ("dwm.eval.cli", "evaluate a run: held-out loss per domain, LAMBADA accuracy/perplexity, lm-eval"),
    "export": ("dwm.eval.export", "export a run's model as a Hugging Face directory"),
    "analyze": ("dwm.analysis.cli", "data preferences of DWM runs per stage: plots and an HTML report"),
    "experiment": ("dwm.experiment", "a grid of runs (selection x weighting x model x seed) -> one results table"),
    "demo": ("dwm.demo", "prepare the shipped corpus, train uniform and DWM, evaluate, print both"),
}


def _setup_env() -> None:
    # No dataset or model hub is reachable in the places this runs; fail fast instead of retrying for a minute.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless it already says it or there is none (None / a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in h.lower()):
            h += " (default: %(default)s)"
        return h


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dwm", description="dwm: learned, dynamic data weighting for LLM pretraining",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    _take_late_overrides(parser, args, extra)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt as e:
        code = getattr(e, "exit_code", None)  # dwm.train.trainer.Preempted: stopped after a checkpoint
        print(str(e) if code else "interrupted", file=sys.stderr)
        return code or 130
    except UserError as e:  # a bad input or config: one clear line, no traceback
        print(f"dwm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"dwm {args.command}: error: no space left on device writing {e.filename or 'a file'} "
              f"({os.strerror(e.errno)}); free space and run it again", file=sys.stderr)
        return 2


def _take_late_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """`key=value` overrides may stand anywhere: argparse gives a positional list only the run before the first
    option (`--config R a=1 --out X b=2` leaves b=2 over); append those to it, in order. Anything else left over
    is an error, as parse_args would say."""
    dest = next((d for d in ("overrides", "override") if isinstance(getattr(args, d, None), list)), None)
    late = [a for a in extra if dest and "=" in a and not a.startswith("-")]
    rest = [a for a in extra if a not in late]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if late:
        setattr(args, dest, [*getattr(args, dest), *late])


if __name__ == "__main__":
    sys.exit(main())
