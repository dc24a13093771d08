"""`dwm experiment`: the grid's plan, a two-cell grid on the tiny preset killed mid-cell and resumed without
redoing the finished cell, tables equal to the runs' own eval.json, the shipped recipes, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from eval_helpers import make_passages, write_jsonl

from dwm.cli import main
from dwm.errors import UserError
from dwm.experiment import RECIPES, ExperimentConfig, load, metrics_of, plan, summarise
from dwm.testing import make_synthetic_prepared

KILL = textwrap.dedent("""
    import os, signal, sys
    from dwm.experiment import load, run_experiment
    from dwm.train.callbacks import Callback

    class KillSecondCell(Callback):  # SIGKILL the grid right after step 2 of its second cell
        attached = 0
        def on_attach(self, ctx):
            KillSecondCell.attached += 1
        def on_step_end(self, ctx, metrics):
            if KillSecondCell.attached == 2 and ctx.step == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    run_experiment(load(sys.argv[1], sys.argv[2:]), callbacks=[KillSecondCell()])
""")


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exp")
    make_synthetic_prepared(root / "data", n_train=96, n_val=16, seq_len=32, vocab_size=300, domains=("a", "b"))
    write_jsonl(make_passages(8, seed=1), root / "ref.jsonl")
    write_jsonl(make_passages(8, seed=2), root / "held.jsonl")
    recipe = root / "two.toml"
    recipe.write_text(textwrap.dedent(f"""
        out = "{root / 'grid'}"
        data = "{root / 'data'}"
        reference = "{root / 'ref.jsonl'}"
        heldout = "{root / 'held.jsonl'}"
        seeds = [0]
        weightings = ["uniform", "dwm"]
        models = ["tiny"]
        steps = 4
        batch_tokens = 256
        overrides = ["train.micro_batch_size=4", "optim.warmup_steps=1", "log.every=1", "train.device=cpu",
                     "weighting.net.width=32", "weighting.net.heads=2", "weighting.net.max_len=32",
                     "weighting.probe_size=20", "weighting.advanced.ref_batch_size=4", "weighting.advanced.batch_size=8"]
        [selections]
        random = ""
    """))
    return {"root": root, "recipe": recipe, "out": root / "grid"}


def test_plan_orders_learners_before_transfers():
    cfg = ExperimentConfig(selections={"random": "", "dsir": ""}, weightings=["uniform", "dwm", "transfer"],
                           models=["cpu-small"], size_transfer=["cpu-mini->cpu-small"], seeds=[0, 1])
    cells = plan(cfg, cfg.seeds)
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys)) == 2 * (4 + 1 + 1 + 1)
    assert keys[:7] == ["random/uniform/cpu-small/s0", "random/dwm/cpu-small/s0", "dsir/uniform/cpu-small/s0",
                        "dsir/dwm/cpu-small/s0", "dsir/transfer/cpu-small/s0", "random/dwm/cpu-mini/s0",
                        "random/transfer/cpu-small/s0"]
    by = {c.key: c for c in cells}
    assert by["dsir/transfer/cpu-small/s1"].source == "random/dwm/cpu-small/s1"
    size = by["random/transfer/cpu-small/s1"]
    assert size.source == "random/dwm/cpu-mini/s1" and "from cpu-mini" in size.row
    for c in cells:  # every replayed learner runs earlier
        if c.source:
            assert keys.index(c.source) < keys.index(c.key)
    cfg.oracle = "books=1.0"  # one oracle cell per model and seed, compared with transfer_from's uniform cell
    oracles = [c for c in plan(cfg, cfg.seeds) if c.selection == "oracle"]
    assert [(c.key, c.baseline, c.row) for c in oracles] == [
        (f"oracle/uniform/cpu-small/s{s}", "random", "oracle (books=1.0) | uniform | cpu-small") for s in (0, 1)]


@pytest.mark.slow
def test_grid_resumes_after_kill_and_tables_equal_eval(grid, one_thread):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", KILL, str(grid["recipe"])], env=env, capture_output=True, text=True, check=False,
                       timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]
    out = grid["out"]
    first = out / "random/uniform/tiny/s0/cell.json"
    second = out / "random/dwm/tiny/s0"
    assert first.is_file() and not (second / "cell.json").exists()
    assert (second / "checkpoints" / "LATEST").is_file()
    before = (first.stat().st_mtime_ns, first.read_text())
    log: list[str] = []
    from dwm.experiment import run_experiment

    records = run_experiment(load(str(grid["recipe"])), log=log.append)
    assert (first.stat().st_mtime_ns, first.read_text()) == before  # the finished cell was not rerun
    assert log[0] == "dwm experiment: 2 cells, 1 finished before, 1 to run"
    assert log[1] == "[1/1] random/dwm/tiny/s0: running"
    resumed = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["checkpoint"] for r in resumed if r.get("event") == "resume"] == ["step_00000002"]
    assert max(r["step"] for r in resumed if "loss" in r) == 4

    # the tables hold the runs' own eval.json numbers
    for rec in records:
        ev = json.loads((out / rec["cell"] / "eval.json").read_text())
        assert rec["metrics"] == metrics_of(ev)
        assert rec["metrics"]["passage_loss"] == ev["lambada"]["passage_loss"]
    rows = list(csv.DictReader((out / "cells.csv").read_text().splitlines()))
    assert [r["cell"] for r in rows] == ["random/uniform/tiny/s0", "random/dwm/tiny/s0"]
    for r, rec in zip(rows, records, strict=True):
        assert float(r["passage_loss"]) == pytest.approx(rec["metrics"]["passage_loss"], rel=1e-12)
        assert float(r["val_loss/a"]) == pytest.approx(rec["metrics"]["val_loss/a"], rel=1e-12)
    res = {r["weighting"]: r for r in csv.DictReader((out / "results.csv").read_text().splitlines())}
    u, d = (rec["metrics"] for rec in records)
    assert float(res["dwm"]["passage_loss - uniform"]) == pytest.approx(d["passage_loss"] - u["passage_loss"])
    assert float(res["uniform"]["lambada_acc"]) == pytest.approx(u["lambada_acc"])
    md = (out / "results.md").read_text()
    assert f"{d['passage_loss']:.4f}" in md and f"{d['passage_loss'] - u['passage_loss']:+.4f}"[1:] in md
    # the selection the cells trained on is a real `dwm select` manifest of the budget
    report = json.loads((out / "selections" / "random-s0.json").read_text())
    assert report["method"] == "random" and report["budget_tokens"] == 4 * 256


@pytest.mark.slow
def test_side_by_side_cells_equal_one_after_another(grid, tmp_path):
    """jobs = 2 (worker processes, a transfer cell waiting for its learner) gives the numbers of jobs = 1 in this
    process, bit for bit, at a fixed thread count."""
    from dwm.experiment import run_experiment

    common = ["weightings=uniform,dwm,transfer", "threads=1", "steps=3", "oracle=a=1.0"]
    runs, threads = {}, torch.get_num_threads()
    for jobs in (1, 2):
        cfg = load(str(grid["recipe"]), [f"out={tmp_path / f'j{jobs}'}", f"jobs={jobs}", *common])
        cfg.selections["again"] = "--method random"  # a second selection (the same documents) to transfer to
        log: list[str] = []
        runs[jobs] = run_experiment(cfg, log=log.append)
        if jobs == 2:
            assert log[0] == "dwm experiment: 6 cells, 0 finished before, 6 to run, 2 at a time, 1 torch thread each"
            started = [x.split("] ")[1].split(":")[0] for x in log if x.endswith(": running")]
            ended = [x.split("] ")[1].split(":")[0] for x in log[1:] if not x.endswith(": running")]
            assert sorted(started) == sorted(ended) == sorted(r["cell"] for r in runs[2])
            assert started.index("again/transfer/tiny/s0") > ended.index("random/dwm/tiny/s0")
    assert [r["cell"] for r in runs[2]] == [r["cell"] for r in runs[1]] == [
        "random/uniform/tiny/s0", "random/dwm/tiny/s0", "again/uniform/tiny/s0", "again/dwm/tiny/s0",
        "again/transfer/tiny/s0", "oracle/uniform/tiny/s0"]
    for a, b in zip(runs[1], runs[2], strict=True):
        assert a["metrics"] == b["metrics"], a["cell"]
    # the oracle trained on its static mixture (domain a only) at the grid's budget, compared with random's uniform
    from dwm.data.dataset import PreparedData

    data = PreparedData(grid["root"] / "data", "train")
    ids = pq.read_table(tmp_path / "j2" / "selections" / "oracle-s0.parquet")["sample_id"].to_numpy()
    assert len(ids) == 3 * 256 // 32 and set(data.domain_ids[ids]) == {data.domains.index("a")}
    res = {r["selection"] + "/" + r["weighting"]: r
           for r in csv.DictReader((tmp_path / "j2" / "results.csv").read_text().splitlines())}
    o, u = runs[2][5]["metrics"], runs[2][0]["metrics"]
    assert float(res["oracle/uniform"]["passage_loss - uniform"]) == pytest.approx(o["passage_loss"] - u["passage_loss"])
    assert torch.get_num_threads() == threads  # the grid's thread count does not outlive it
    with pytest.raises(UserError, match="callbacks run in this process: jobs must be 1"):
        run_experiment(load(str(grid["recipe"]), [f"out={tmp_path / 'cb'}", "jobs=2"]), callbacks=[object()])


def test_summary_statistics_by_hand():
    recs = [{"row": f"r | {w} | m", "selection": "r", "weighting": w, "model": "m", "seed": s,
             "metrics": {"passage_loss": v, "avg_acc": a}}
            for w, vals in (("uniform", [(5.0, 0.1), (6.0, 0.2)]), ("dwm", [(4.5, 0.2), (5.9, 0.2)]))
            for s, (v, a) in enumerate(vals)]
    s = {x["weighting"]: x for x in summarise(recs)}
    assert s["dwm"]["passage_loss"] == pytest.approx(5.2)
    assert s["dwm"]["passage_loss se"] == pytest.approx(0.7)  # stdev([4.5, 5.9]) / sqrt 2
    assert s["dwm"]["passage_loss - uniform"] == pytest.approx(-0.3)  # mean(-0.5, -0.1)
    assert s["dwm"]["passage_loss - uniform se"] == pytest.approx(0.2)
    assert "passage_loss - uniform" not in s["uniform"]
    # the oracle's row: a uniform cell, differenced against its baseline selection's uniform cell
    recs += [{"row": "oracle (a=1.0) | uniform | m", "selection": "oracle", "weighting": "uniform", "model": "m",
              "seed": seed, "baseline": "r", "metrics": {"passage_loss": v}} for seed, v in enumerate([4.0, 5.6])]
    o = {x["row"]: x for x in summarise(recs)}["oracle (a=1.0) | uniform | m"]
    assert o["passage_loss - uniform"] == pytest.approx(-0.7)  # mean(-1.0, -0.4)
    assert o["passage_loss - uniform se"] == pytest.approx(0.3)


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.toml")))
def test_shipped_recipes_load_and_models_build(name):
    from transformers import LlamaForCausalLM

    from dwm.run import load_config, recipe_path
    from dwm.train.model import PRESETS, count_params, llama_config

    cfg = load(name)
    assert cfg.selections and cfg.seeds
    load_config(recipe_path(cfg.run_recipe))  # the run recipe each cell starts from exists and parses
    want = {"paper-370m": (330e6, 420e6), "paper-1.3b": (1.2e9, 1.45e9), "cpu-small": (4.5e6, 6e6),
            "cpu-mini": (1.2e6, 1.7e6)}
    models = cfg.models + [m for pair in cfg.size_transfer for m in pair.split("->")]
    for m in models:
        with torch.device("meta"):
            n = count_params(LlamaForCausalLM(llama_config(PRESETS[m], 32000 if m.startswith("paper") else 8192)))
        assert want[m][0] < n < want[m][1], (m, n)


def test_table_keys_from_the_command_line():
    """A table key (selections) is set whole as a TOML inline table, or one entry at a time as KEY.NAME=value."""
    assert load("cpu-mini", ['selections={random = "", mine = "--method dsir --top-k"}']).selections == {
        "random": "", "mine": "--method dsir --top-k"}
    assert load("cpu-mini", ["selections.dsir=--top-k", "selections.more=--method random"]).selections == {
        "random": "", "dsir": "--top-k", "quality": "--classifier", "more": "--method random"}
    with pytest.raises(UserError, match=r"selections: '\{random' is not a TOML inline table"):
        load("cpu-mini", ["selections={random"])
    with pytest.raises(UserError, match=r"expected a table of name = value \(on the command line selections="):
        load("cpu-mini", ["selections=random"])
    with pytest.raises(UserError, match="selections: at least one selection"):
        load("cpu-mini", ["selections={}"])
    with pytest.raises(UserError, match=r"selections is a table of name = value: set one entry as selections\.NAME"):
        load("cpu-mini", ["selections.dsir.x=1"])


def test_bad_recipes_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="did you mean cpu-mini"):
        load("cpu-mni")
    with pytest.raises(UserError, match=r"weightings\[1\].*did you mean dwm"):
        load("cpu-mini", ["weightings=uniform,dwn"])
    with pytest.raises(UserError, match="transfer_from.*did you mean random"):
        load("cpu-mini", ["transfer_from=randm"])
    with pytest.raises(UserError, match="LEARNER->RECEIVER"):
        load("cpu-mini", ["size_transfer=cpu-mini"])
    with pytest.raises(UserError, match="mixture 'books': expected domain=share pairs"):
        load("cpu-mini", ["oracle=books"])
    with pytest.raises(UserError, match="config key jobs: must be > 0, got 0"):
        load("cpu-mini", ["jobs=0"])
    with pytest.raises(UserError, match="threads: >= 0"):
        load("cpu-mini", ["threads=-1"])
    bad = tmp_path / "bad.toml"
    bad.write_text('seeds = [0]\nselction = {random = ""}\n')
    with pytest.raises(UserError, match="unknown config key selction.*did you mean selections"):
        load(str(bad))
    assert main(["experiment", "cpu-mini", f"data={tmp_path / 'nowhere'}"]) == 2
    assert "prepared data directory not found" in capsys.readouterr().err


@pytest.mark.slow
def test_launcher_runs_cells_as_dwm_train_subprocesses(grid, tmp_path):
    from dwm.experiment import run_experiment

    launcher = tmp_path / "launch.sh"  # records the thread count the cell's process was given, then runs it
    launcher.write_text(f'#!/bin/sh\necho "$OMP_NUM_THREADS" > {tmp_path / "threads"}\nexec {sys.executable} "$@"\n')
    cfg = load(str(grid["recipe"]), [f"out={tmp_path / 'g'}", "weightings=uniform", f"launcher=sh {launcher}",
                                     "steps=2", "threads=3"])
    records = run_experiment(cfg, log=lambda s: None)
    assert (tmp_path / "threads").read_text().strip() == "3"
    run = tmp_path / "g" / "random/uniform/tiny/s0"
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_00000002"
    assert "weighting.mode=uniform" not in (run / "config.toml").read_text()  # the resolved config, not argv
    assert 'mode = "uniform"' in (run / "config.toml").read_text()
    assert records[0]["metrics"] == metrics_of(json.loads((run / "eval.json").read_text()))
