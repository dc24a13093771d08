"""benchmarks/bench_dwm.py identifies a cached run by its resolved configuration: the same configuration reuses
the run (its own cell's or another's), an option an older run's config.toml lacks counts as equal only at its
default, and any changed value (a moved recipe default) does not match. Also the ablation table's row selection
(--rows) and its form without an oracle (--no-oracle)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dwm.config import to_toml
from dwm.run import load_config, recipe_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_dwm", REPO / "benchmarks" / "bench_dwm.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_dwm"] = mod  # its dataclasses resolve their module
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_dwm", None)


def _cfg(out: Path, *overrides: str):
    return load_config(recipe_path("cpu-small-dwm"), [f"out={out}", "train.seed=1", *overrides])


def _finished(run: Path, cfg) -> Path:
    run.mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(cfg))
    (run / "result.json").write_text(json.dumps({"heldout_passage_loss": 1.0}))
    return run


def test_same_configuration_matches_whatever_the_output_directory(bench, tmp_path):
    toml = tmp_path / "config.toml"
    toml.write_text(to_toml(_cfg(tmp_path / "a")))
    assert bench.same_run(toml, _cfg(tmp_path / "b"))
    assert not bench.same_run(toml, _cfg(tmp_path / "b", "weighting.advanced.kl=1.0"))
    assert not bench.same_run(toml, _cfg(tmp_path / "b", "train.seed=2"))


def test_an_option_the_old_file_lacks_matches_only_at_its_default(bench, tmp_path):
    text = to_toml(_cfg(tmp_path / "a"))
    assert "probe_lm_loss = true" in text
    toml = tmp_path / "config.toml"
    toml.write_text(text.replace("probe_lm_loss = true\n", ""))  # a run from before the option existed
    assert bench.same_run(toml, _cfg(tmp_path / "b"))
    assert not bench.same_run(toml, _cfg(tmp_path / "b", "weighting.advanced.probe_lm_loss=false"))
    # a run from before [weighting.advanced]: its flat [weighting] keys count under their new names
    head, _, rest = text.partition("[weighting.advanced]\n")
    block, nl, tail = rest.partition("\n[")
    flat = (head + nl + tail if nl else head).replace("[weighting]\n", "[weighting]\n" + block + "\n")
    assert "[weighting.advanced]" not in flat and "kl = 0.25" in block
    toml.write_text(flat)
    assert bench.same_run(toml, _cfg(tmp_path / "b"))
    assert not bench.same_run(toml, _cfg(tmp_path / "b", "weighting.advanced.kl=0.5"))
    # a key the current configuration no longer has is never the same run
    toml.write_text(text.replace("[weighting]\n", "[weighting]\nretired_option = 3\n"))
    assert not bench.same_run(toml, _cfg(tmp_path / "b"))


def test_cached_run_prefers_the_cells_own_then_any_finished_run_of_the_target(bench, tmp_path):
    out = tmp_path / "cache"
    cell = bench.Cell("novels", "dwm", 1)
    cfg = _cfg(out / cell.key)
    assert bench.cached_run(cell, cfg, out) is None
    other = _finished(out / "novels" / "ablation_x-s1", _cfg(out / "novels" / "ablation_x-s1"))
    (out / "novels" / "unfinished-s1").mkdir()
    (out / "novels" / "unfinished-s1" / "config.toml").write_text(to_toml(cfg))  # no result.json: not reused
    assert bench.cached_run(cell, cfg, out) == other
    own = _finished(out / cell.key, cfg)
    assert bench.cached_run(cell, cfg, out) == own
    assert bench.cached_run(cell, _cfg(out / cell.key, "weighting.advanced.kl=0.35"), out) is None
    assert bench.cached_run(bench.Cell("speech", "dwm", 1), cfg, out) is None  # another target's runs


def test_a_relative_input_path_is_the_same_run_as_its_absolute_form(bench, tmp_path):
    """`--out benchmarks/out/x` writes relative data.dir / reference paths into config.toml; the same cell run
    with an absolute --out is the same run (paths are relative to the repository, where the benchmark runs)."""
    rel = ["data.dir=benchmarks/out/x/data", "weighting.reference=data/target/reference.jsonl"]
    toml = tmp_path / "config.toml"
    toml.write_text(to_toml(_cfg(tmp_path / "a", *rel)))
    absolute = [f"data.dir={REPO / 'benchmarks/out/x/data'}", f"weighting.reference={REPO / 'data/target/reference.jsonl'}"]
    assert bench.same_run(toml, _cfg(tmp_path / "b", *absolute))
    assert not bench.same_run(toml, _cfg(tmp_path / "b", f"data.dir={REPO / 'benchmarks/out/y/data'}",
                                         absolute[1]))


def test_rows_select_by_prefix_keep_the_baseline_and_refuse_an_unknown_row(bench):
    kl = "batch_size=64, kl=0.25 (weaker still)"
    rows = bench.ablation_rows("ablation", ["batch_size=64, kl=0.25"])
    assert list(rows) == ["**shipped defaults**", kl]
    # measured from the stop-20 defaults (kl 0.5, batch_size 64), the lever last
    assert rows[kl] == ["weighting.advanced.kl=0.5", "weighting.advanced.batch_size=64", "weighting.advanced.kl=0.25"]
    assert bench.ablation_rows("ablation") == {"**shipped defaults**": [], **bench.ABLATIONS}
    assert len(bench.ablation_rows("ablation", ["batch_size=64, kl=0.3"])) == 2  # a prefix: kl=0.35
    assert len(bench.ablation_rows("ablation", ["batch_size=64"])) == 1 + 6  # the six levers of the stop-20 defaults
    assert len(bench.ablation_rows("ablation", ["kl=0.5"])) == 1 + 2  # the stop-21 defaults and their batch_size=64
    with pytest.raises(SystemExit, match=r"--rows 'batch_size=64, kl=0.4' is no row of --part ablation; did you "
                                         r"mean 'batch_size=64, kl=0.35'"):
        bench.ablation_rows("ablation", ["batch_size=64, kl=0.4"])


def test_rows_keep_their_measured_configuration_and_distinct_run_keys(bench):
    """A row's overrides reproduce the defaults it was measured from, whatever the recipe says now, and no two rows
    share a cache directory (keys are cut to 60 characters)."""
    from dwm.run import load_config, recipe_path

    for name, ov in bench.ABLATIONS.items():
        cfg = load_config(recipe_path("cpu-small-dwm"), ov).weighting.advanced
        lever = name.split(" (")[0].split(", ")[-1]
        if name.startswith(("batch_size=64", "kl=1.0", "kl=0.5, batch_size=64")):
            assert cfg.batch_size == 64, name
        elif not lever.startswith("batch_size="):
            assert cfg.batch_size == 128, name
        if not lever.startswith("kl="):  # the kl of the defaults the row was measured from
            base = 1.0 if name.startswith("kl=1.0") else 0.5 if name.startswith(("kl=0.5", "batch_size=64")) else 0.25
            assert cfg.kl == base, name
    weights = load_config(recipe_path("cpu-small-dwm"), bench.WEIGHTS_DEFAULTS).weighting
    adv = weights.advanced
    assert (weights.apply, adv.kl, adv.batch_size, adv.buffer_stages) == ("weights", 1.0, 64, 1)
    for part in ("ablation", "ablation-weights"):
        keys = [bench.Cell("novels", f"ablation:{n}", 0).key for n in bench.ablation_rows(part)]
        assert len(set(keys)) == len(keys), part


def test_ablation_table_without_an_oracle_has_paired_differences_and_no_share(bench):
    t = bench.Target("speech", Path("d"), Path("r"), Path("h"), "speech")
    results = {}
    for s, (u, a, b) in enumerate([(6.6, 6.5, 6.45), (6.7, 6.5, 6.6)]):
        for arm, ref in (("uniform", u), ("ablation:**shipped defaults**", a),
                         ("ablation:batch_size=64, kl=0.25 (weaker still)", b)):
            results[bench.Cell("speech", arm, s).key] = {"reference_passage_loss": ref,
                                                         "heldout_passage_loss": ref + 0.01, "train_seconds": 100.0}
    rows = bench.ablation_rows("ablation", ["batch_size=64, kl=0.25"])
    text = bench.report_ablation(results, t, [0, 1], [0], "ablation", rows, oracle=False)
    assert "no oracle trained" in text
    lines = [x for x in text.splitlines() if x.startswith("| batch_size=64, kl=0.25")]
    # reference - uniform: -0.15 and -0.10 -> mean -0.125, s.e. 0.025; the share column empty
    want = "| batch_size=64, kl=0.25 (weaker still) | -0.1250 ± 0.0250 [-0.15, -0.1] | — | -0.1250 ± 0.0250 [-0.15, -0.1] | 1.00 |"
    assert lines == [want]
