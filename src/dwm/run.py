"""Where the parts are wired: the run config composed from each part's section, weighters and selectors resolved
by name, the Trainer built, and `dwm train`.

    RunConfig = TrainerConfig (out, model, data, optim, train, checkpoint, log: dwm/train/config.py)
              + selector (dwm/train/selector.py) + influence (dwm/selection/config.py)
              + weighting (dwm/weighting/config.py)

`weighting.mode` names a weighter in `dwm.train.weighter.WEIGHTERS` ('uniform', 'dwm', anything registered in
process or through the `dwm.weighters` entry-point group) or is a run directory whose learned weighting models to
replay; `selector.mode` names a selector in `dwm.train.selector.SELECTORS`. The built-in Data Weighting Model is
registered in dwm.runconfig (with RunConfig), lazily, so neither the trainer nor a uniform run imports it; so is
the MATES-style online selector `influence` (dwm/selection/influence.py), which gets the [influence] section.

`dwm train` launches with torchrun for DDP (`torchrun --nproc_per_node N -m dwm.cli train ...`); the same command
runs on one process. `--data`, `--selection`, `--out`, `--weighting` and `--keep-learning` are shortcuts for the
dotted keys data.dir, data.selection, out, weighting.mode and weighting.keep_learning; trailing `key=value`
arguments override anything (see `--help-config`).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dwm import config as C
from dwm.errors import UserError
from dwm.runconfig import RECIPES, RunConfig, help_config, load_config, recipe_path, validate
from dwm.train.config import plan_for_data
from dwm.train.memory import check_memory
from dwm.train.selector import SELECTORS, Selector
from dwm.train.weighter import WEIGHTERS, Weighter

# the names this module always offered; the run config, its loading and the registrations are dwm.runconfig
__all__ = ["GUARDED", "NAME_OR_PATH_KEYS", "PATH_KEYS", "RECIPES", "RunConfig", "TrainResult", "absolute_paths",
           "add_arguments", "adopt_replay_settings", "bilevel_param_copies", "build_selector", "build_trainer",
           "build_weighter", "check_resume", "config_from_args", "help_config", "latest_step", "load_config",
           "recipe_path", "resolve_config_path", "run", "train", "validate"]


def adopt_replay_settings(cfg: RunConfig) -> list[str]:
    """A replayed DWM (weighting.mode = RUN_DIR) acts as it was learned: the source's apply, candidates, draw,
    temperature and floor replace this config's (stage files written before they were recorded keep this config's
    apply, candidates and draw). Returns the keys that changed, as `key: this -> source`."""
    w = cfg.weighting
    stage0 = Path(w.mode) / "weighting" / "stage_0.json"
    if w.mode in WEIGHTERS or not stage0.is_file():
        return []
    import json

    src = json.loads(stage0.read_text()).get("dwm", {})
    changed = []
    for key, obj in (("apply", w), ("candidates", w), ("temperature", w), ("floor", w), ("draw", w.advanced)):
        if key in src and src[key] != getattr(obj, key):
            changed.append(f"{key}: {getattr(obj, key)} -> {src[key]}")
            setattr(obj, key, type(getattr(obj, key))(src[key]))
    return changed


def build_weighter(cfg: RunConfig) -> Weighter:
    """The weighter `weighting.mode` names, constructed with its config section (`config_section`); a run
    directory replays its learned weighting models (the Data Weighting Model's transfer)."""
    mode = cfg.weighting.mode
    cls = WEIGHTERS.get(mode if mode in WEIGHTERS else "dwm")
    return cls(getattr(cfg, getattr(cls, "config_section", "weighting")))


def build_selector(cfg: RunConfig, weighter: Weighter | None = None) -> Selector:
    """The selector `selector.mode` names, or the one the weighter's batches must be drawn with (its `selector`),
    constructed with `selector` config, its own section (`config_section`) and, when it `uses_scorer`, the
    weighter's scorer: one object both hold."""
    mode = cfg.selector.mode
    wanted = getattr(weighter, "selector", None)
    if wanted and wanted != mode:
        if mode != "sequential":
            raise UserError(f"the {weighter.name} weighter draws its batches with the {wanted!r} selector; "
                            f"selector.mode must stay 'sequential', not {mode!r}")
        mode = wanted
    cls = SELECTORS.get(mode)
    args = [cfg.selector] + ([getattr(cfg, cls.config_section)] if getattr(cls, "config_section", None) else [])
    if not getattr(cls, "uses_scorer", False):
        return cls(*args)
    if getattr(weighter, "scorer", None) is None:
        raise UserError(f"selector.mode = {mode!r} draws by a weighter's scores; weighting.mode = "
                        f"{cfg.weighting.mode!r} has none (use weighting.mode = dwm)")
    return cls(*args, scorer=weighter.scorer)


# keys holding a path (made absolute, so RUN_DIR/config.toml works from any directory), and keys that hold a
# registered name or a path (made absolute only when they name an existing path)
PATH_KEYS = ("out", "data.dir", "data.selection", "weighting.reference", "influence.reference", "doge.reference")
NAME_OR_PATH_KEYS = ("model.spec", "weighting.mode")
# what a resume may not change without --allow-config-change (the tokenizer is compared by its file)
GUARDED = ("model.", "data.", "weighting.", "selector.", "influence.", "doge.", "odm.")


def _get(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg, key: str, value) -> None:
    *head, last = key.split(".")
    obj = cfg
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy of cfg whose paths are absolute (relative ones are relative to the current directory): what
    config.toml stores, so that `--resume`, `dwm eval` and `dwm analyze` work from anywhere."""
    from dwm.train.model import PRESETS

    cfg = copy.deepcopy(cfg)
    for key in (*PATH_KEYS, *NAME_OR_PATH_KEYS):
        v = _get(cfg, key)
        if not v or os.path.isabs(v):
            continue
        if key in NAME_OR_PATH_KEYS and (v in PRESETS or v in WEIGHTERS or not Path(v).exists()):
            continue
        _set(cfg, key, os.path.abspath(os.path.expanduser(v)))
    return cfg


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _allowed(key: str, allow: tuple[str, ...]) -> bool:
    return any(key == a or key.startswith(a.rstrip(".") + ".") for a in allow)


def check_resume(cfg: RunConfig, allow: list[str] | tuple[str, ...] = ()) -> None:
    """`--resume` into cfg.out: refuse (one line, the changed keys with old -> new) a change of the model, data,
    weighting or selection settings from the run's config.toml, or of the tokenizer (RUN_DIR/tokenizer.json vs
    the data's), unless `allow` names the keys (or their sections). A run without config.toml is not checked."""
    from dwm.data.tokenizer import describe_tokenizer, tokenizer_fingerprint

    run = Path(cfg.out)
    stored_path = run / "config.toml"
    if not stored_path.is_file():
        return
    allow = tuple(a.strip() for a in allow if a.strip())
    old = _flat(C.to_dict(absolute_paths(load_config(stored_path))))
    new = _flat(C.to_dict(absolute_paths(cfg)))
    both_uniform = old.get("weighting.mode") == new.get("weighting.mode") == "uniform"
    no_influence = "influence" not in (old.get("selector.mode"), new.get("selector.mode"))
    changed = []
    for key in sorted(set(old) | set(new)):
        if not key.startswith(GUARDED) or old.get(key) == new.get(key) or _allowed(key, allow):
            continue
        if (both_uniform and key.startswith("weighting.")) or (no_influence and key.startswith("influence.")):
            continue  # settings of a component the run does not use
        changed.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    run_tok, data_tok = run / "tokenizer.json", Path(cfg.data.dir) / "tokenizer.json"
    if (run_tok.is_file() and data_tok.is_file() and not _allowed("tokenizer", allow)
            and tokenizer_fingerprint(run_tok) != tokenizer_fingerprint(data_tok)):
        changed.append(f"tokenizer {describe_tokenizer(run_tok)} -> {describe_tokenizer(data_tok)}")
    if changed:
        keys = ",".join(c.split(" ", 1)[0] for c in changed)
        raise UserError(f"--resume: {run} was trained with another config: {'; '.join(changed)}; pass "
                        f"--allow-config-change {keys} to continue anyway, or train into a new --out")


def latest_step(run_dir: str | Path) -> int | None:
    """The step of RUN_DIR's newest complete checkpoint (its LATEST pointer), None without one."""
    try:
        name = (Path(run_dir) / "checkpoints" / "LATEST").read_text().strip()
        return int(name.removeprefix("step_"))
    except (OSError, ValueError):
        return None


def bilevel_param_copies(cfg: RunConfig) -> int:
    """Parameter-sized fp32 tensors a bi-level update holds beyond the training state (the saved parameters, the
    preconditioner P, one gradient buffer g then v), 0 for a run without updates (dwm.weighting.bilevel)."""
    w = cfg.weighting
    return 3 if (w.mode == "dwm" or w.keep_learning) else 0


def build_trainer(cfg: RunConfig, *, resume: bool = False, callbacks=(), allow_config_change=()):
    """Validate the whole config, then the Trainer with the configured weighter, selector and experiment tracker
    (`log.tracker`, after the given callbacks). Paths are made absolute (config.toml stores them so); a resume
    refuses a changed model / data / weighting / tokenizer unless `allow_config_change` names the keys."""
    from dwm.train.trackers import make_tracker
    from dwm.train.trainer import Trainer

    cfg = absolute_paths(cfg)
    validate(cfg, check_paths=True)
    if resume:
        check_resume(cfg, allow_config_change)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_memory(cfg, plan_for_data(cfg, world), world, bilevel_param_copies(cfg))  # before anything is written
    for change in adopt_replay_settings(cfg):
        print(f"dwm train: replaying {cfg.weighting.mode} as it was learned: weighting.{change}", file=sys.stderr)
    tracker = make_tracker(cfg.log, config=C.to_dict(cfg))
    weighter = build_weighter(cfg)
    return Trainer(cfg, resume=resume, weighter=weighter, selector=build_selector(cfg, weighter),
                   callbacks=[*callbacks, *([tracker] if tracker is not None else [])])


@dataclass
class TrainResult:
    """What `train` (`dwm.train`) returns: the run directory, the resolved config that ran, and the last logged
    metrics (empty on the ranks of a DDP run other than 0). Path-like: it stands for the run directory."""

    run_dir: Path
    config: RunConfig
    metrics: dict = field(default_factory=dict)
    is_main: bool = True

    def __fspath__(self) -> str:  # stands for the run directory: dwm.evaluate(result), dwm.analyze([result])
        return str(self.run_dir)

    @property
    def step(self) -> int | None:
        """The last optimizer step (None when nothing was logged)."""
        return self.metrics.get("step")

    @property
    def loss(self) -> float | None:
        """The last logged training loss (None when nothing was logged)."""
        return self.metrics.get("loss")


def train(config: RunConfig | str | Path | None = None, *, overrides=(), resume: bool = False,
          callbacks=(), allow_config_change=()) -> TrainResult:
    """Train a run (`dwm train` as a function); returns a TrainResult.

    config: a RunConfig (copied, never changed), a TOML file or a shipped recipe name (`cpu-small-dwm`), or None
    (the built-in defaults; with resume, the run directory's config.toml when it has one, as `dwm train --resume`).
    overrides: applied in order after config: a mapping of dotted keys to typed values (`{"train.max_steps": 100,
    "data.dir": path}`; sections as nested mappings), `key=value` strings, or a sequence of both.
    resume: continue from the run directory's newest good checkpoint; a changed model / data / weighting /
    tokenizer is refused unless allow_config_change names the keys (`check_resume`), and a run already at its
    planned steps is left untouched (empty metrics). callbacks: `dwm.train.callbacks.Callback`s.
    A bad key, value or path raises UserError. SIGTERM / SIGINT: the step finishes, a checkpoint is written and
    `dwm.train.trainer.Preempted` (a KeyboardInterrupt) is raised."""
    if isinstance(config, RunConfig):
        import copy

        cfg = copy.deepcopy(config)
        C.apply_overrides(cfg, overrides)
    else:
        if config is not None and not isinstance(config, (str, Path)):
            raise UserError(f"config must be a RunConfig, a TOML path or a recipe name, not {type(config).__name__}")
        out = None
        if config is None and resume:
            probe = RunConfig()
            C.apply_overrides(probe, overrides)
            out = probe.out
        cfg = load_config(resolve_config_path(None if config is None else str(config), out, resume), overrides)
    cfg = absolute_paths(cfg)
    if resume:
        check_resume(cfg, allow_config_change)
        plan = validate(cfg, check_paths=True)
        done = latest_step(cfg.out)
        if done is not None and plan is not None and plan.total_steps <= done:
            print(f"dwm train: {cfg.out} is already at step {done} and the run plans {plan.total_steps} steps: "
                  "nothing to do (raise train.max_steps or train.max_tokens to train on)", file=sys.stderr)
            return TrainResult(run_dir=Path(cfg.out), config=cfg, metrics={},
                               is_main=int(os.environ.get("RANK", "0")) == 0)
    trainer = build_trainer(cfg, resume=resume, callbacks=callbacks, allow_config_change=allow_config_change)
    if trainer.is_main:
        if cfg.optim.warmup_steps > trainer.plan.total_steps:
            print(f"dwm train: warning: optim.warmup_steps {cfg.optim.warmup_steps} > the run's "
                  f"{trainer.plan.total_steps} steps: warmup is capped at {trainer.plan.total_steps}, so the learning "
                  "rate only rises", file=sys.stderr)
        print(_summary(trainer), file=sys.stderr, flush=True)
        _retire_stale_eval(trainer, resume)
    final = trainer.train()
    return TrainResult(run_dir=trainer.run_dir, config=cfg, metrics=dict(final or {}), is_main=trainer.is_main)


# ---------------------------------------------------------------- `dwm train`


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config or a shipped recipe name (e.g. cpu-small-dwm); with --resume and "
                                    "no --config, RUN_DIR/config.toml is used (default: none, built-in defaults)")
    p.add_argument("--data", help="prepared data directory (data.dir; default data/prepared)")
    p.add_argument("--selection", help="parquet manifest with sample_id: restricts and orders the data "
                                       "(data.selection; default: none, the whole split)")
    p.add_argument("--out", help="run directory (out; default runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's newest good checkpoint "
                                                         "(a changed model, data, weighting or tokenizer is refused)")
    p.add_argument("--allow-config-change", metavar="KEY[,KEY]", default=None,
                   help="with --resume: accept these changed config keys (or sections, e.g. weighting; 'tokenizer' "
                        "for another tokenizer) instead of refusing them")
    p.add_argument("--weighting", metavar="MODE_OR_RUN_DIR",
                   help="'uniform', 'dwm', 'domains' (weighting.domain_weights), the per-domain mixtures 'doge' "
                        "([doge]) and 'odm' ([odm]), another registered weighter, or a run directory whose weighting "
                        "models to replay (weighting.mode; default uniform)")
    p.add_argument("--keep-learning", action="store_true",
                   help="with --weighting RUN_DIR: keep updating the replayed model (weighting.keep_learning)")
    p.add_argument("--help-config", action="store_true", help="print every config key, its type, default and doc")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. optim.lr=3e-4")


def resolve_config_path(arg: str | None, out: str | None, resume: bool) -> Path | None:
    if arg:
        p = Path(arg)
        if p.is_file():
            return p
        rp = recipe_path(arg.removesuffix(".toml"))
        if rp.is_file():
            return rp
        known = sorted(r.stem for r in RECIPES.glob("*.toml"))
        raise UserError(f"config {arg} does not exist (nor is it a shipped recipe: {', '.join(known)})"
                        f"{C.did_you_mean(arg, known)}")
    if resume and out and (Path(out) / "config.toml").is_file():
        return Path(out) / "config.toml"
    return None


def config_from_args(args: argparse.Namespace) -> RunConfig:
    shortcuts = {key: getattr(args, flag) for flag, key in (("data", "data.dir"), ("selection", "data.selection"),
                                                             ("out", "out"), ("weighting", "weighting.mode"))
                 if getattr(args, flag) is not None}
    if args.keep_learning:
        shortcuts["weighting.keep_learning"] = True
    path = resolve_config_path(args.config, args.out, args.resume)
    if path is None and not args.overrides and not shortcuts:
        raise UserError("no configuration: give --config FILE (or a recipe name) and/or key=value overrides")
    return load_config(path, [shortcuts, *args.overrides])


def _summary(trainer) -> str:
    """The start-up line: parameters, tokens per step, accumulation, device, planned steps."""
    p = trainer.plan
    n_params = sum(t.numel() for t in trainer.model.parameters())
    return (f"dwm train: {trainer.cfg.model.spec} ({n_params / 1e6:.2f}M parameters) on {trainer.device} x "
            f"{trainer.world_size}; {p.global_batch_size} samples x {p.seq_len} = {p.global_batch_size * p.seq_len:,} "
            f"tokens per step (micro-batch {p.micro_batch_size}, accumulation {p.grad_accum}); steps "
            f"{trainer.step} -> {p.total_steps} (warmup {p.warmup_steps}); weighting {trainer.cfg.weighting.mode}; "
            f"run dir {trainer.run_dir}")


def run(args: argparse.Namespace, callbacks=()) -> int:
    from dwm.train.trainer import Preempted

    if args.help_config:
        print(help_config())
        return 0
    allow = [k for k in (getattr(args, "allow_config_change", "") or "").split(",") if k.strip()]
    if allow and not args.resume:
        raise UserError("--allow-config-change only applies with --resume")
    try:
        res = train(config_from_args(args), resume=args.resume, callbacks=callbacks, allow_config_change=allow)
    except Preempted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(e, file=sys.stderr)
        return e.exit_code
    if res.is_main and res.metrics:
        print(f"done: step {res.step}, loss {res.loss:.4f}, run dir {res.run_dir}", file=sys.stderr)
    return 0


def _retire_stale_eval(trainer, resume: bool) -> None:
    """A resume that trains on: RUN_DIR/eval.json describes an older checkpoint; keep it as eval.step_N.json."""
    ev = trainer.run_dir / "eval.json"
    if resume and ev.is_file() and trainer.step < trainer.total_steps:
        dest = ev.with_name(f"eval.step_{trainer.step:08d}.json")
        os.replace(ev, dest)
        print(f"dwm train: {ev} described step {trainer.step}; kept as {dest.name} (run `dwm eval` again at the end)",
              file=sys.stderr)
