"""The library: `import dwm` is cheap; dwm.prepare / select / train / evaluate / analyze on tiny synthetic data
write the very files their `dwm` commands write; typed overrides equal their key=value form; bad input is a
UserError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY_OVERRIDES
from eval_helpers import make_passages, write_jsonl

import dwm
from dwm import config as C
from dwm.cli import main
from dwm.errors import UserError
from dwm.testing import _WORDS, make_synthetic_prepared

WORDS = {"books": _WORDS[0].split(), "code": _WORDS[2].split()}
# the tiny-model run of conftest.TINY_OVERRIDES, as typed values
TINY = {"model.spec": "tiny", "train.global_batch_tokens": 256, "train.micro_batch_size": 4, "train.max_steps": 3,
        "log.every": 1, "log.progress": False, "checkpoint.every": 0, "optim.warmup_steps": 1, "train.device": "cpu"}


def _same_files(a: Path, b: Path) -> list[str]:
    """The relative paths of every file under a; asserts b holds the same files with the same bytes."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    return names


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    d = tmp_path_factory.mktemp("corpus")
    for dom, words in WORDS.items():
        with open(d / f"{dom}__toy.jsonl", "w") as f:
            f.writelines(json.dumps({"id": f"{dom}{i}", "text": " ".join(rng.choices(words, k=60))}) + "\n"
                         for i in range(30))
    return d


@pytest.fixture(scope="module")
def passages(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("target")
    return {"reference": write_jsonl(make_passages(8, seed=1), d / "ref.jsonl"),
            "heldout": write_jsonl(make_passages(8, seed=2), d / "held.jsonl")}


def test_import_dwm_is_cheap_and_train_is_both_package_and_function():
    code = ("import sys, dwm; heavy = [m for m in ('torch', 'numpy', 'pyarrow', 'transformers', 'typing') "
            "if m in sys.modules]; print(heavy, sorted(m for m in sys.modules if m.startswith('dwm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(dwm.__file__).parents[1])}).stdout
    assert out.split("\n")[0] == "[] ['dwm', 'dwm.train']"
    import importlib

    trainer = importlib.import_module("dwm.train.config")  # the package's modules are where they were
    assert dwm.train.config is trainer and callable(dwm.train)
    from dwm.run import train

    assert dwm.prepare.__module__ == "dwm.data.prepare" and dwm.select.__name__ == "select_documents"
    assert dwm.UserError is UserError and "overrides" in str(__import__("inspect").signature(dwm.train))
    assert train.__doc__ and all(getattr(dwm, n).__doc__ for n in ("prepare", "select", "evaluate", "analyze"))


def test_prepare_writes_what_the_cli_writes(corpus, tmp_path):
    info = dwm.prepare(corpus, tmp_path / "api", vocab_size=300, seq_len=32, workers=1)
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "cli"), "--vocab-size", "300", "--seq-len", "32",
                 "--workers", "1", "--no-progress"]) == 0
    names = _same_files(tmp_path / "api", tmp_path / "cli")
    assert {"meta.json", "tokenizer.json", "train.bin", "train.parquet", "val.bin", "stats.json"} <= set(names)
    meta = json.loads((tmp_path / "cli" / "meta.json").read_text())
    assert info.meta == meta and info.dir == tmp_path / "api" and os.fspath(info) == str(tmp_path / "api")
    assert (info.seq_len, info.domains, info.is_pool) == (32, ["books", "code"], False)
    assert info.n_samples("train") == meta["splits"]["train"]["n_samples"] > 0
    # a pool of the one shard, both ways
    pool = dwm.prepare([info], tmp_path / "pool_api", pool=True)
    assert main(["prepare", "--pool", "--out", str(tmp_path / "pool_cli"), str(tmp_path / "cli")]) == 0
    assert pool.is_pool and pool.n_samples() == info.n_samples()
    api_meta = json.loads((tmp_path / "pool_api" / "meta.json").read_text())
    cli_meta = json.loads((tmp_path / "pool_cli" / "meta.json").read_text())
    assert [s["dir"] for s in api_meta.pop("shards")] == ["../api"]
    assert [s["dir"] for s in cli_meta.pop("shards")] == ["../cli"]
    assert api_meta == cli_meta


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    return make_synthetic_prepared(tmp_path_factory.mktemp("sel") / "data", n_train=80, n_val=8, seq_len=32)


def test_select_writes_what_the_cli_writes(pool_dir, passages, tmp_path):
    sel = dwm.select(dwm.PreparedInfo(pool_dir, {}), "dsir", 800, tmp_path / "api.parquet", seed=3, target=passages["reference"],
                     workers=1, dsir_ngrams=1, dsir_min_words=5, top_k=True)
    assert main(["select", "--data", str(pool_dir), "--method", "dsir", "--budget-tokens", "800", "--out",
                 str(tmp_path / "cli.parquet"), "--seed", "3", "--target", str(passages["reference"]),
                 "--workers", "1", "--dsir-ngrams", "1", "--dsir-min-words", "5", "--top-k"]) == 0
    api, cli = pq.read_table(sel.manifest), pq.read_table(tmp_path / "cli.parquet")
    assert api.column_names == cli.column_names == ["sample_id", "doc_id", "score"]
    assert api.to_pydict() == cli.to_pydict() and api.num_rows > 0
    def strip(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "seconds"}

    meta = {k: strip(json.loads(t.schema.metadata[b"dwm.selection"])) for k, t in (("api", api), ("cli", cli))}
    assert meta["api"] == meta["cli"] and meta["api"]["settings"]["ngrams"] == 1
    report = json.loads((tmp_path / "cli.json").read_text())
    assert strip(sel.report) == strip(report) == strip(json.loads(sel.report_path.read_text()))
    assert os.fspath(sel) == str(tmp_path / "api.parquet") and sel.report["selected_tokens"] >= 800


def test_select_options_parse_like_the_cli():
    from dwm.selection.cli import OPTIONS, parse_options

    assert parse_options(["--dsir-ngrams", "1", "--top-k", "--method", "quality"]) == {
        "dsir_ngrams": 1, "top_k": True, "method": "quality"}
    assert parse_options([]) == {}
    assert {"data", "method", "budget_tokens", "out", "dsir_ngrams", "ref_model", "device"} <= set(OPTIONS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same tiny uniform run trained through dwm.train (typed overrides) and through `dwm train`."""
    data = make_synthetic_prepared(tmp_path_factory.mktemp("train") / "data")
    root = data.parent
    base = dwm.load_config(None, {**TINY, "data.dir": data, "out": root / "api"})
    before = C.to_toml(base)
    res = dwm.train(base, overrides={"train": {"seed": 1}})
    assert C.to_toml(base) == before  # the caller's config is not changed
    rc = main(["train", "--data", str(data), "--out", str(root / "cli"), *TINY_OVERRIDES, "train.max_steps=3",
               "train.seed=1"])
    assert rc == 0
    return {"data": data, "api": root / "api", "cli": root / "cli", "result": res}


def test_train_writes_what_the_cli_writes(runs):
    res = runs["result"]
    assert res.run_dir == runs["api"] and res.step == 3 and res.is_main and res.config.train.seed == 1
    cfg = {k: (runs[k] / "config.toml").read_text().replace(str(runs[k]), "RUN") for k in ("api", "cli")}
    assert cfg["api"] == cfg["cli"] and 'out = "RUN"' in cfg["api"]
    recs = {k: [json.loads(x) for x in (runs[k] / "metrics.jsonl").read_text().splitlines()] for k in ("api", "cli")}
    losses = {k: [(r["step"], r["loss"]) for r in v if "loss" in r] for k, v in recs.items()}
    assert losses["api"] == losses["cli"] and len(losses["api"]) == 3
    assert res.loss == losses["api"][-1][1]
    _same_files(runs["api"] / "checkpoints" / "step_00000003" / "model",
                runs["cli"] / "checkpoints" / "step_00000003" / "model")


def test_train_resumes_from_the_run_directory_config(runs, tmp_path):
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(runs["api"], run)
    # the copied config.toml still names the old out; the resumed run is told its new one
    res = dwm.train(run / "config.toml", overrides={"out": run, "train.max_steps": 4}, resume=True)
    assert res.step == 4 and (run / "checkpoints" / "step_00000004").is_dir()
    # no config: resuming reads the run directory's config.toml (now with its own out), as `dwm train --resume`
    res = dwm.train(overrides={"out": run, "train.max_steps": 5}, resume=True)
    assert res.step == 5 and res.config.model.spec == "tiny" and res.config.train.seed == 1


def test_evaluate_returns_what_the_cli_writes(runs, passages):
    run = runs["api"]
    res = dwm.evaluate(run, target=passages["heldout"], batch_size=4, write=False)
    assert not (run / "eval.json").exists()
    assert main(["eval", str(run), "--target", str(passages["heldout"]), "--batch-size", "4", "--device",
                 "cpu"]) == 0
    assert json.loads(json.dumps(res)) == json.loads((run / "eval.json").read_text())
    assert res.passage_loss == res["lambada"]["passage_loss"] and res.lambada_acc == res["lambada"]["acc"]
    assert res.val_loss == res["heldout"]["overall"]["loss"] and res["step"] == 3
    assert dwm.evaluate(run, target=None, write=False).passage_loss is None


@pytest.mark.slow
def test_analyze_writes_what_the_cli_writes(runs, passages, tmp_path):
    overrides = {**TINY, "data.dir": runs["data"], "out": tmp_path / "dwm", "train.max_steps": 4,
                 "weighting": {"mode": "dwm", "reference": passages["reference"], "probe_size": 20,
                               "ref_batch_size": 4, "updates_per_stage": 1, "net": {"width": 32, "heads": 2}}}
    res = dwm.train(overrides=overrides)
    run = res.run_dir
    summary = dwm.analyze([res], tmp_path / "api")  # a TrainResult stands for its run directory
    assert main(["analyze", str(run), "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert {"runs": summary.runs, "plots": [p.name for p in summary.plots]} == cli
    assert summary.report == tmp_path / "api" / "report.html" and summary.report.is_file()
    assert all(p.is_file() for p in summary.plots) and summary.runs[0]["stages"]
    assert dwm.analyze(run).out == run / "analysis"


def test_typed_overrides_equal_their_key_value_form(prepared_dir):
    typed = dwm.load_config(None, [
        {"train": {"max_steps": 7}, "data.dir": prepared_dir, "weighting.mode": "dwm"},
        "optim.lr=0.01", {"optim.lr": "2e-3", "log.progress": False, "weighting.domain_weights": "a=2"}])
    text = dwm.load_config(None, ["train.max_steps=7", f"data.dir={prepared_dir}", "weighting.mode=dwm",
                                  "optim.lr=0.002", "log.progress=false", "weighting.domain_weights=a=2"])
    assert C.to_toml(typed) == C.to_toml(text) and typed.optim.lr == 0.002 and typed.train.max_steps == 7


def test_experiment_cells_train_the_same_through_a_launcher(tmp_path):
    """A launcher's `dwm train` subprocess gets the cell's overrides as key=value arguments: the same config."""
    from dwm.experiment import Cell, ExperimentConfig, _argv, _train_overrides
    from dwm.run import RECIPES

    cfg = ExperimentConfig(data="d", reference="r.jsonl", overrides=["optim.lr=0.001"])
    for cell in (Cell("random", "dwm", "tiny", 1), Cell("dsir", "transfer", "tiny", 0, source="random/dwm/tiny/s0")):
        ov = _train_overrides(cfg, tmp_path, cell, tmp_path / "sel.parquet")
        assert all(isinstance(x, str) for x in _argv(ov))
        typed, argv = (dwm.load_config(RECIPES / "cpu-small-dwm.toml", o) for o in (ov, _argv(ov)))
        assert C.to_toml(typed) == C.to_toml(argv)
        assert typed.log.progress is False and typed.optim.lr == 0.001 and typed.train.seed == cell.seed


def test_bad_input_is_a_user_error(prepared_dir, corpus, runs, tmp_path):
    cases = [
        (lambda: dwm.select(prepared_dir, "dsri", 100, tmp_path / "s.parquet"), "did you mean dsir"),
        (lambda: dwm.select(prepared_dir, "random", 0, tmp_path / "s.parquet"), "must be > 0"),
        (lambda: dwm.select(prepared_dir, "random", 100, tmp_path / "s.parquet", engine="spark"), "--engine"),
        (lambda: dwm.select(prepared_dir, "quality", 100, tmp_path / "s.parquet"), "exactly one of"),
        (lambda: dwm.prepare(corpus, tmp_path / "p", packing="rows"), "--packing"),
        (lambda: dwm.prepare(tmp_path / "missing", tmp_path / "p"), "missing"),
        (lambda: dwm.prepare([prepared_dir], tmp_path / "p", pool=True, shard="1/2"), "--shard does not apply"),
        (lambda: dwm.train(overrides={**TINY, "train.max_step": 3}), "did you mean train.max_steps"),
        (lambda: dwm.train(overrides={"train.max_steps": 2.5}), "expected int"),
        (lambda: dwm.train(overrides={"train.max_steps": "three"}), "expected int"),
        (lambda: dwm.train(overrides={"train": 3}), "is a section"),
        (lambda: dwm.train(overrides=[42]), "neither a key=value string nor a mapping"),
        (lambda: dwm.train("cpu-smal-dwm"), "did you mean cpu-small-dwm"),
        (lambda: dwm.train(3.5), "config must be a RunConfig"),
        (lambda: dwm.train(overrides={**TINY, "data.dir": tmp_path / "nowhere"}), "nowhere"),
        (lambda: dwm.evaluate(tmp_path / "missing", target=None), "missing"),
        (lambda: dwm.evaluate(runs["api"], target=tmp_path / "nope.jsonl"), "target file not found"),
        (lambda: dwm.analyze(tmp_path / "missing"), "does not exist"),
        (lambda: dwm.analyze([runs["api"], runs["cli"]], data=[prepared_dir] * 3), "--data given 3 times"),
        (lambda: dwm.analyze([]), "no run directory"),
    ]
    for call, words in cases:
        with pytest.raises(UserError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value), (words, str(e.value))
