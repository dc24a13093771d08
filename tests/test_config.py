"""TrainConfig: TOML + dotted overrides, typed parsing, validation of every class of bad value, recipes."""

from __future__ import annotations

import re
import sys

import pytest

from dwm.config import iter_keys, to_toml
from dwm.errors import UserError
from dwm.run import RunConfig, help_config, load_config, recipe_path, validate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES = ["cpu-small-uniform", "cpu-small-dwm", "cpu-base-dwm", "paper-370m-dwm", "paper-1.3b-dwm"]


def test_overrides_parse_by_type():
    cfg = load_config(None, ["optim.lr=3e-4", "weighting.net.width=64", "train.compile=true", "data.shuffle=no",
                             "train.max_tokens=1e6", "model.spec=tiny", "weighting.mode=dwm"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.weighting.net.width == 64 and cfg.train.compile is True and cfg.data.shuffle is False
    assert cfg.train.max_tokens == 1_000_000 and isinstance(cfg.train.max_tokens, int)
    assert cfg.weighting.mode == "dwm"


@pytest.mark.parametrize("item, match", [
    ("optim.lrr=1", "did you mean optim.lr"),
    ("nosuch.key=1", "unknown config key nosuch"),
    ("train.seed=abc", "expected int"),
    ("train.micro_batch_size=2.5", "expected int"),
    ("optim.lr=fast", "expected float"),
    ("optim.lr=nan", "expected float"),
    ("train.compile=maybe", "expected bool"),
    ("optim=3", "is a section"),
    ("optim.lr", "not key=value"),
])
def test_bad_overrides(item, match):
    with pytest.raises(UserError, match=match):
        load_config(None, [item])


def test_toml_types_checked(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[optim]\nlr = "high"\n')
    with pytest.raises(UserError, match="optim.lr: expected float"):
        load_config(p)
    p.write_text('[train]\ncompile = 1\n')
    with pytest.raises(UserError, match="expected bool"):
        load_config(p)
    p.write_text('[optim\nlr = 1\n')
    with pytest.raises(UserError, match="cannot parse"):
        load_config(p)
    p.write_text('[weighting.net]\nwidht = 3\n')
    with pytest.raises(UserError, match="did you mean weighting.net.width"):
        load_config(p)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("item, match", [
    ("optim.lr=0", "optim.lr: must be > 0"),
    ("optim.lr=-1e-3", "optim.lr: must be > 0"),
    ("optim.beta2=1.0", "optim.beta2"),
    ("optim.min_lr_ratio=1.5", "min_lr_ratio"),
    ("train.micro_batch_size=0", "micro_batch_size"),
    ("train.max_steps=0", "no training budget"),
    ("train.max_tokens=1000", "only one of"),
    ("train.device=tpu", "train.device"),
    ("train.precision=fp8", "train.precision"),
    ("model.spec=gpt-17", "unknown preset"),
    ("model.attn_implementation=magic", "attn_implementation"),
    ("checkpoint.keep_last=0", "keep_last"),
    ("weighting.mode=softmax", "weighting.mode"),
    ("weighting.backend=autograd", "weighting.backend"),
    ("weighting.schedule=weekly", "weighting.schedule"),
    ("weighting.ref_loss=word", "weighting.ref_loss"),
    ("weighting.precondition=newton", "weighting.precondition"),
    ("weighting.temperature=0", "weighting.temperature"),
    ("weighting.floor=2", "weighting.floor"),
    ("weighting.stages=0", "weighting.stages"),
    ("weighting.uniform_stages=5", "weighting.uniform_stages \\+ weighting.frozen_stages: must be below"),
    ("weighting.frozen_stages=5", "got 0 \\+ 5: phi would never learn"),
    ("weighting.frozen_stages=-1", "weighting.frozen_stages"),
    ("weighting.uniform_stages=-1", "weighting.uniform_stages"),
    ("weighting.net.heads=3", "divisible"),
    ("weighting.keep_learning=true", "keep_learning"),
])
def test_invalid_values_rejected(item, match):
    """Each bad value is refused with one line naming the key: choices as the config is parsed, ranges and
    cross-field rules by validate."""
    with pytest.raises(UserError, match=match):
        validate(load_config(None, ["train.max_steps=10", item]), check_paths=False)


@pytest.mark.parametrize("item, hint", [("weighting.backend=fdd", "did you mean fd?"),
                                        ("weighting.schedule=stagged", "did you mean staged?"),
                                        ("train.precision=fp23", "did you mean fp32?"),
                                        ("weighting.mode=dwn", "did you mean dwm?"),
                                        ("selector.mode=sequental", "did you mean sequential?")])
def test_choices_are_types_with_did_you_mean(item, hint):
    with pytest.raises(UserError, match=re.escape(hint)):
        validate(load_config(None, ["train.max_steps=10", item]), check_paths=False)


def test_literal_choices_checked_once_for_programmatic_configs():
    """A config built in code (no parsing) is still checked, by the one generic Literal check."""
    cfg = load_config(None, ["train.max_steps=10"])
    cfg.weighting.precondition = "newtn"  # type: ignore[assignment]
    with pytest.raises(UserError, match=r"weighting.precondition: 'newtn' is not one of adam, sgd"):
        validate(cfg, check_paths=False)


def test_data_dependent_checks(make_cfg, tmp_path):
    plan = validate(make_cfg(), world_size=1)
    assert (plan.seq_len, plan.global_batch_size, plan.grad_accum, plan.total_steps) == (32, 8, 2, 4)
    assert validate(make_cfg(), world_size=2).grad_accum == 1
    with pytest.raises(UserError, match="not divisible"):
        validate(make_cfg("train.micro_batch_size=3"))
    with pytest.raises(UserError, match="not divisible"):
        validate(make_cfg(), world_size=3)
    with pytest.raises(UserError, match="multiple of the data's seq_len"):
        validate(make_cfg("train.global_batch_tokens=100"))
    with pytest.raises(UserError, match="does not exist"):
        validate(make_cfg(f"data.dir={tmp_path / 'nope'}"))
    with pytest.raises(UserError, match="no split"):
        validate(make_cfg("data.split=test"))
    with pytest.raises(UserError, match="data.selection"):
        validate(make_cfg(f"data.selection={tmp_path / 'nope.parquet'}"))
    with pytest.raises(UserError, match="weighting.reference"):
        validate(make_cfg("weighting.mode=dwm", f"weighting.reference={tmp_path / 'ref.jsonl'}"))


def test_toml_roundtrip_and_help(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "weighting.net.width=64", 'out=runs/a "b"', "data.shuffle=false"])
    text = to_toml(cfg)
    assert tomllib.loads(text)["weighting"]["net"]["width"] == 64
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert load_config(path) == cfg
    assert load_config(path) != RunConfig()
    h = help_config()
    for key, _, _, doc in iter_keys(RunConfig):
        assert key in h
        assert doc, f"{key} has no docstring"
    assert "weighting.net.width (int, default 128)" in h and "optim.lr (float, default 0.0005)" in h


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_load_and_validate(name, prepared_dir, tmp_path):
    path = recipe_path(name)
    assert path.is_file()
    cfg = load_config(path, [f"data.dir={prepared_dir}", f"weighting.reference={path}"])  # any existing file
    plan = validate(cfg)
    assert plan.total_steps > 0 and plan.grad_accum >= 1
    assert cfg.weighting.mode == ("uniform" if "uniform" in name else "dwm")
    assert cfg.model.spec == name.rsplit("-", 1)[0]


def test_cli_help_config_and_errors(capsys, prepared_dir):
    from dwm.cli import main

    assert main(["train", "--help-config"]) == 0
    assert "optim.lr" in capsys.readouterr().out
    assert main(["train", "--data", str(prepared_dir), "optim.lr=-1", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dwm train: error: config key optim.lr") and "Traceback" not in err


@pytest.mark.parametrize("command", ["corpus", "target", "prepare", "select", "train", "eval", "export", "analyze",
                                     "demo"])
def test_every_cli_option_has_help_and_default(command):
    """`dwm COMMAND --help`: every option and argument says what it does, and every option with a default
    (other than none or off) shows it."""
    import argparse

    from dwm.cli import COMMANDS, build_parser

    assert command in COMMANDS
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    text = sub.format_help()
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"dwm {command} {name}: no help"
        if action.option_strings and action.default not in (None, False):
            shown = sub._get_formatter()._get_help_string(action)
            assert "default" in shown.lower(), f"dwm {command} {name}: default not shown"
    assert "default" in text


def _recipe_commands() -> list[tuple[str, list[str]]]:
    """Every command written in a shipped recipe's comments (a comment line indented `#   ` that starts with `dwm`
    or `torchrun ... -m dwm.cli`), as dwm argv lists."""
    import shlex

    out = []
    recipes = sorted(recipe_path("x").parent.glob("*.toml")) + sorted(recipe_path("x").parent.glob("experiments/*.toml"))
    for path in recipes:
        for line in path.read_text().splitlines():
            if not line.startswith("#   "):
                continue
            words = shlex.split(line[1:].split("  #")[0])
            if words[:1] == ["dwm"]:
                out.append((f"{path.name}: {line[1:].strip()}", words[1:]))
            elif words[:1] == ["torchrun"] and "dwm.cli" in words:
                out.append((f"{path.name}: {line[1:].strip()}", words[words.index("dwm.cli") + 1:]))
    return out


def test_recipe_comment_commands_parse():
    """The commands a recipe's comments tell the user to run are commands `dwm` accepts as written (parsed by the
    real CLI parser, not run), and names given with --config are shipped recipes."""
    from dwm.cli import build_parser

    cmds = _recipe_commands()
    assert len(cmds) >= 6  # the paper recipes and the experiment grids carry their commands
    for where, argv in cmds:
        assert all("..." not in a for a in argv), f"{where}: a placeholder, not a command"
        try:
            args = build_parser(argv[0]).parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{where}: dwm rejects it (exit {e.code})") from None
        if getattr(args, "config", None):
            from dwm.run import resolve_config_path

            assert resolve_config_path(args.config, None, False).is_file(), where


@pytest.mark.parametrize("name", ["paper-370m-dwm", "paper-1.3b-dwm"])
def test_paper_recipes_carry_the_validated_weighting(name, prepared_dir):
    """The paper recipes run the library's validated [weighting] defaults (those the cpu-small recipe spells out),
    except the keys that scale with the batch, and never copy an untrained LM embedding into phi."""
    paper = load_config(recipe_path(name), [f"data.dir={prepared_dir}"]).weighting
    small = load_config(recipe_path("cpu-small-dwm")).weighting
    lib = RunConfig().weighting
    for key in ("apply", "candidates", "temperature", "kl", "phi_steps", "buffer_stages", "updates_per_stage",
                "stages", "backend", "schedule", "lr"):
        assert getattr(paper, key) == getattr(small, key) == getattr(lib, key), key
    assert paper.net == small.net == lib.net
    assert paper.batch_size == 2 * 2048 and small.batch_size == 2 * 64  # 2 x the global batch, as validated
    assert not paper.net.init_from_lm_embedding


def test_init_from_lm_embedding_is_refused_for_a_fresh_lm(prepared_dir):
    cfg = load_config(None, [f"data.dir={prepared_dir}", "model.spec=tiny", "weighting.mode=dwm",
                             "weighting.net.init_from_lm_embedding=true", "train.max_steps=1"])
    with pytest.raises(UserError, match="init_from_lm_embedding: the LM 'tiny' starts from random weights"):
        validate(cfg, check_paths=False)


def test_python_dash_m_dwm_is_the_dwm_command(monkeypatch, capsys):
    """`python -m dwm ...` (what torchrun launches) runs the same `dwm` command: --help lists every subcommand and
    exits 0; an unknown subcommand exits 2."""
    import importlib
    import runpy

    from dwm.cli import COMMANDS

    monkeypatch.setattr(sys, "argv", ["dwm", "--help"])
    importlib.import_module("dwm.__main__")  # importing it runs nothing
    assert capsys.readouterr().out == ""
    monkeypatch.delitem(sys.modules, "dwm.__main__")  # run_module executes it afresh (restored afterwards)
    with pytest.raises(SystemExit) as done:
        runpy.run_module("dwm", run_name="__main__")
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: dwm")
    assert all(name in out for name in COMMANDS)
    monkeypatch.setattr(sys, "argv", ["dwm", "trian"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("dwm", run_name="__main__")
    assert done.value.code == 2
