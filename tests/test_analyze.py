"""`dwm analyze`: the probes' lm_loss, the measures by hand, a one-run and a two-run report (valid PNGs, HTML whose
every <img> exists), a run from before lm_loss, and bad inputs as one-line errors."""

from __future__ import annotations

import itertools
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dwm.analysis.measures import bigram_novelty, correlation_ratio, one_vs_rest, spearman, weight_summary
from dwm.cli import main
from dwm.run import build_trainer, load_config
from dwm.testing import make_synthetic_prepared

STEPS = 10
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Synthetic data (3 domains), a reference set, and two small DWM runs that differ in seed and temperature."""
    root = tmp_path_factory.mktemp("analyze")
    data = make_synthetic_prepared(root / "data", n_train=96, n_val=16, seq_len=32, vocab_size=300,
                                   domains=("a", "b", "c"))
    from tokenizers import Tokenizer

    from dwm.data.dataset import PreparedData

    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    val = PreparedData(data, "val")
    ref = root / "ref.jsonl"
    ref.write_text("".join(json.dumps({"text": tok.decode(val.tokens[i, : val.n_tokens[i]].tolist())[:160]}) + "\n"
                           for i in range(12)))
    common = [f"data.dir={data}", "model.spec=tiny", "train.global_batch_tokens=256", "train.micro_batch_size=4",
              f"train.max_steps={STEPS}", f"weighting.reference={ref}", "weighting.net.width=32",
              "weighting.net.heads=2", "weighting.probe_size=30", "weighting.advanced.ref_batch_size=4",
              "weighting.advanced.lr=0.01", "log.progress=false", "log.every=5", "train.device=cpu",
              "weighting.mode=dwm", "weighting.advanced.updates_per_stage=2", "weighting.apply=weights",
              "weighting.advanced.batch_size=0", "weighting.advanced.buffer_stages=1",
              "weighting.net.use_domain_feature=false"]  # in-batch weights: every step's weights are in the
    # metrics, each update probes one global batch (8 samples) and each stage's signal holds its own updates'
    out = {"data": data, "root": root, "common": common}
    for name, extra in (("dwm_a", ["checkpoint.every=2", "checkpoint.keep_every=2"]),
                        ("dwm_b", ["checkpoint.every=0", "train.seed=1", "weighting.temperature=0.5"])):
        build_trainer(load_config(None, [*common, f"out={root / name}", *extra])).train()
        out[name] = root / name
    return out


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def check_report(out: Path) -> dict:
    """Every PNG valid (signature, PIL verify, matplotlib reads it), every <img> of the HTML exists, every PNG is
    referenced; returns summary.json."""
    from matplotlib.image import imread
    from PIL import Image

    report = out / "report.html"
    parser = _Images()
    parser.feed(report.read_text(encoding="utf-8"))
    parser.close()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and sorted(parser.srcs) == pngs
    for src in parser.srcs:
        p = out / src
        assert p.is_file() and p.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(p) as im:
            im.verify()
        assert imread(p).ndim == 3
    return json.loads((out / "summary.json").read_text())


def test_measures_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40])[0] == pytest.approx(1)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1)
    rho, n = spearman([1, 2, np.nan, 4, 5], [1, 3, 7, 2, 9])
    assert n == 4 and rho == pytest.approx(np.corrcoef([0, 1, 2, 3], [0, 2, 1, 3])[0, 1])
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3])[0])
    g = np.array(["x", "x", "y", "y"])
    assert correlation_ratio(g, [1, 2, 3, 4]) == pytest.approx(np.sqrt(4 / 5))  # ranks 0..3: between 4, total 5
    assert correlation_ratio(g, [1, 4, 2, 3]) == pytest.approx(0)
    assert one_vs_rest(g, [1, 2, 3, 4])["y"] > 0 > one_vs_rest(g, [1, 2, 3, 4])["x"]
    rows = np.array([[1, 2, 3, 0], [1, 2, 4, 0], [5, 6, 0, 0]])
    # row 0: {12, 23}, row 1: {12, 24}, row 2: {56} (n_tokens 2) -> 12 shared, 23 / 24 / 56 unique
    assert bigram_novelty(rows, np.array([3, 3, 2])) == pytest.approx([0.5, 0.5, 1.0])
    s = weight_summary(np.array([2.0, 1.0, 1.0, 0.0]))
    assert s["ess_fraction"] == pytest.approx(16 / 6 / 4) and s["median"] == 1.0 and s["max"] == 2.0
    assert weight_summary(np.ones(5))["entropy"] == pytest.approx(1)


@pytest.mark.slow
def test_probes_record_the_lm_loss_of_their_step(runs):
    """probes/stage_k.parquet's lm_loss is the LM's per-sample NLL at the stage's step (checked against the
    checkpoint of that step)."""
    from transformers import AutoModelForCausalLM

    from dwm.data.dataset import PreparedData
    from dwm.nn.losses import per_sample_nll

    run = runs["dwm_a"]
    t = pq.read_table(run / "probes" / "stage_4.parquet")
    step = int(t.column("step")[0].as_py())
    assert step == 8
    model = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / f"step_{step:08d}" / "model").eval()
    b = PreparedData(runs["data"], "train").batch(t.column("sample_id").to_numpy())
    with torch.no_grad():
        want = per_sample_nll(model(input_ids=b.input_ids).logits, b.input_ids, b.n_tokens).numpy()
    assert np.allclose(t.column("lm_loss").to_numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_probe_lm_loss_off_skips_that_column_and_trains_the_same(runs):
    """weighting.probe_lm_loss = false: the probes have no lm_loss column (dwm analyze then skips that
    correlation), and nothing else changes: the same probe scores and weights, the same training losses."""
    run = runs["root"] / "dwm_b_no_lm_loss"
    build_trainer(load_config(None, [*runs["common"], f"out={run}", "checkpoint.every=0", "train.seed=1",
                                     "weighting.temperature=0.5", "weighting.advanced.probe_lm_loss=false"])).train()
    for k in range(5):
        t, ref = (pq.read_table(r / "probes" / f"stage_{k}.parquet") for r in (run, runs["dwm_b"]))
        assert "lm_loss" not in t.column_names and "lm_loss" in ref.column_names
        assert t.select(["sample_id", "score", "weight"]).equals(ref.select(["sample_id", "score", "weight"]))

    def losses(r):
        rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["loss"]) for m in rows if "loss" in m]

    assert losses(run) == losses(runs["dwm_b"]) and len(losses(run)) >= 2


def test_one_run_report(runs, capsys):
    run = runs["dwm_a"]
    assert main(["analyze", str(run)]) == 0
    assert "report:" in capsys.readouterr().err
    out = run / "analysis"
    summary = check_report(out)
    assert {p.name for p in out.glob("*.png")} == {"domain_weights.png", "correlations.png",
                                                      "weight_distribution.png", "weight_vs_loss.png",
                                                      "signal_by_domain.png"}
    (r,) = summary["runs"]
    assert r["lm_loss"] and r["probe_size"] == 30 and [s["stage"] for s in r["stages"]] == [0, 1, 2, 3, 4]
    html = (out / "report.html").read_text(encoding="utf-8")
    for k in range(5):
        st = r["stages"][k]
        probes = pq.read_table(run / "probes" / f"stage_{k}.parquet").to_pydict()
        w, dom = np.array(probes["weight"]), np.array(probes["domain"])
        assert st["mean_weight_by_domain"] == pytest.approx({d: float(w[dom == d].mean()) for d in "abc"})
        assert st["spearman"]["LM loss"] == pytest.approx(spearman(w, probes["lm_loss"])[0], abs=1e-9)
        assert set(st["spearman"]) == {"length (tokens)", "LM loss", "diversity (bigram novelty)", "score: quality"}
        assert 0 <= st["domain_eta"] <= 1 and set(st["domain_vs_rest"]) == {"a", "b", "c"}
        assert st["top"][0]["weight"] == pytest.approx(w.max()) and st["bottom"][0]["weight"] == pytest.approx(w.min())
        for ex in st["top"] + st["bottom"]:
            assert ex["text"].strip() and len(ex["text"]) <= 301
            assert ex["text"][:40].replace("&", "&amp;").replace("<", "&lt;") in html
        # what the hypergradient said: the stage's probed samples' signal per domain, by hand
        sig = pq.read_table(run / "signal" / f"stage_{k}.parquet").to_pydict()
        v, d = np.array(sig["signal"]), np.array(sig["domain"])
        assert len(v) == 2 * 8  # two updates in every stage, each probing one 8-sample batch
        want = {g: (v[d == g].mean(), v[d == g].std(ddof=1) / np.sqrt((d == g).sum()), (d == g).sum())
                for g in np.unique(d)}
        got = st["signal_by_domain"]
        assert set(got) == set(want)
        for g, (m, se, n) in want.items():
            assert got[g]["mean"] == pytest.approx(m) and got[g]["n"] == n
            assert got[g]["se"] == pytest.approx(se) if n > 1 else np.isnan(got[g]["se"])
        ds = sorted(want)
        assert st["weight_follows_signal"] == pytest.approx(
            spearman([w[dom == g].mean() for g in ds], [want[g][0] for g in ds])[0], nan_ok=True)
    assert "stage 4 (step 8)" in html and "bigram novelty" in html and "correlation ratio" in html
    assert "What the hypergradient said" in html and "Spearman: weight vs signal" in html


@pytest.mark.slow
def test_two_runs_side_by_side(runs, tmp_path):
    out = tmp_path / "both"
    assert main(["analyze", str(runs["dwm_a"]), str(runs["dwm_b"]), "--out", str(out), "--examples", "2"]) == 0
    summary = check_report(out)
    assert [r["label"] for r in summary["runs"]] == ["dwm_a", "dwm_b"]
    assert all(len(st["top"]) == 2 for r in summary["runs"] for st in r["stages"])
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('class="cols" style="grid-template-columns: repeat(2,') >= 3
    from PIL import Image

    with Image.open(out / "domain_weights.png") as two, Image.open(runs["dwm_a"] / "analysis" /
                                                                    "domain_weights.png") as one:
        assert two.width > 1.8 * one.width  # one column per run


@pytest.mark.slow
def test_run_without_lm_loss_is_analyzed_without_that_correlation(runs, tmp_path, capsys):
    old = tmp_path / "old_run"
    shutil.copytree(runs["dwm_b"], old, ignore=shutil.ignore_patterns("analysis", "checkpoints"))
    for p in (old / "probes").glob("*.parquet"):
        t = pq.read_table(p)
        pq.write_table(t.drop(["lm_loss"]), p)
    assert main(["analyze", str(old)]) == 0
    assert "no lm_loss column" in capsys.readouterr().err
    summary = check_report(old / "analysis")
    (r,) = summary["runs"]
    assert not r["lm_loss"] and all(st["spearman"]["LM loss"] is None for st in r["stages"])
    assert all(st["spearman"]["length (tokens)"] is not None for st in r["stages"])
    assert not (old / "analysis" / "weight_vs_loss.png").exists()
    assert "LM-loss correlation is skipped" in (old / "analysis" / "report.html").read_text(encoding="utf-8")
    # a run from before signal/ was written: no signal section, plot or numbers
    shutil.rmtree(old / "signal")
    assert main(["analyze", str(old), "--out", str(tmp_path / "no_signal")]) == 0
    summary = check_report(tmp_path / "no_signal")
    assert all(st["signal_by_domain"] is None for st in summary["runs"][0]["stages"])
    assert not (tmp_path / "no_signal" / "signal_by_domain.png").exists()
    assert "What the hypergradient said" not in (tmp_path / "no_signal" / "report.html").read_text(encoding="utf-8")


def _one_line_error(capsys, args: list[str], *needles: str) -> None:
    rc = main(["analyze", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dwm analyze: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(runs, tmp_path, capsys):
    _one_line_error(capsys, [str(tmp_path / "nope")], "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, [str(tmp_path / "empty")], "not a run directory")
    uni = tmp_path / "uniform"
    build_trainer(load_config(None, [f"data.dir={runs['data']}", f"out={uni}", "model.spec=tiny",
                                     "train.global_batch_tokens=256", "train.micro_batch_size=4",
                                     "train.max_steps=1", "log.progress=false", "train.device=cpu"])).train()
    _one_line_error(capsys, [str(uni)], "not a DWM run", "uniform")
    # a DWM run whose probes are gone
    noprobe = tmp_path / "noprobe"
    shutil.copytree(runs["dwm_b"], noprobe, ignore=shutil.ignore_patterns("analysis", "checkpoints", "probes"))
    _one_line_error(capsys, [str(noprobe)], "no probes/stage_*.parquet")
    # its data directory moved: an error naming --data, and --data fixes it
    moved = tmp_path / "moved"
    shutil.copytree(runs["dwm_b"], moved, ignore=shutil.ignore_patterns("analysis", "checkpoints"))
    cfg = (moved / "config.toml").read_text().replace(str(runs["data"]), str(tmp_path / "gone"))
    (moved / "config.toml").write_text(cfg)
    _one_line_error(capsys, [str(moved)], "does not exist", "--data")
    _one_line_error(capsys, [str(moved), "--data", str(tmp_path / "gone")], "--data")
    other = make_synthetic_prepared(tmp_path / "other", n_train=96, domains=("x", "y", "z"), seed=3)
    _one_line_error(capsys, [str(moved), "--data", str(other)], "not the data this run trained on")
    _one_line_error(capsys, [str(moved), str(runs["dwm_a"]), "--data", "a", "--data", "b", "--data", "c"],
                    "--data given 3 times")
    assert main(["analyze", str(moved), "--data", str(runs["data"]), "--out", str(tmp_path / "fixed")]) == 0
    check_report(tmp_path / "fixed")
    capsys.readouterr()
    (moved / "signal" / "stage_2.parquet").write_bytes(b"not parquet")
    _one_line_error(capsys, [str(moved), "--data", str(runs["data"])], "cannot read", "signal/stage_2.parquet")


def test_trained_shares_reads_the_weighted_steps_of_metrics_jsonl(tmp_path):
    """Mean share per domain over the logged weighted steps; a domain missing from a step counts 0 there; events
    and unweighted runs contribute nothing."""
    from dwm.analysis.runs import trained_shares

    assert trained_shares(tmp_path) == {}  # no metrics.jsonl
    recs = [{"step": 10, "loss": 6.0, "dwm_stage": 0.0, "share/books": 0.75, "share/code": 0.25},
            {"step": 20, "loss": 5.9, "dwm_stage": 0.0, "share/books": 1.0},
            {"step": 20, "event": "stage", "stage": 1},
            {"step": 30, "loss": 5.8}]  # a step without weights (not a DWM step)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n")
    assert trained_shares(tmp_path) == {"books": 0.875, "code": 0.125}
    torn = json.dumps({"step": 30, "loss": 5.8, "dwm_stage": 0.0, "share/code": 1.0})[:25]  # a killed run's last line
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(torn)
    assert trained_shares(tmp_path) == {"books": 0.875, "code": 0.125}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(recs[3]) + "\n")
    assert trained_shares(tmp_path) == {}


# ------------------------------------------------------------------------------------------ plots: edge cases
class _TextRun:
    """A RunData whose texts are made up (no tokenizer, no prepared data): for the report's edge cases."""

    @staticmethod
    def make(weights: list[np.ndarray], n_tokens: np.ndarray, label: str = "r"):
        from dwm.analysis.runs import RunData, Stage

        class Run(RunData):
            def text(self, sample_id: int, chars: int = 300) -> str:
                return f"sample {sample_id}"

        n = len(n_tokens)
        rng = np.random.default_rng(0)
        stages = [Stage(k=k, step=2 * k, total_steps=10, updates=1, skipped=0, weight=w, score=np.log(w),
                        lm_loss=rng.normal(3, 0.5, n)) for k, w in enumerate(weights)]
        return Run(dir=Path("."), label=label, mode="dwm", data_dir=Path("."), split="train", domains=["a", "b"],
                   ids=np.arange(n), domain=np.array(["a", "b"] * (n // 2)), n_tokens=n_tokens,
                   novelty=rng.uniform(0, 1, n), scores={}, stages=stages)


def test_constant_property_is_said_not_nan(tmp_path):
    """Every probe sample of the same length (fully packed rows): the length has no correlation with anything; the
    summary, the HTML and the correlation plot's legend say so instead of showing NaN. Constant weights (a uniform
    stage) are named as such."""
    from dwm.analysis.report import analyze, plot_correlations, run_summary

    rng = np.random.default_rng(1)
    w = [np.exp(rng.normal(0, 1, 20)), np.ones(20)]  # stage 1: every weight 1
    run = _TextRun.make(w, np.full(20, 32))
    analyze([run], tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())["runs"][0]
    st0, st1 = s["stages"]
    assert st0["spearman"]["length (tokens)"] is None  # NaN is written as null
    assert st0["no_correlation"] == {"length (tokens)": "constant: no correlation"}
    assert st0["spearman"]["LM loss"] is not None and "LM loss" not in st0["no_correlation"]
    assert st1["no_correlation"]["LM loss"] == "constant weights: no correlation"
    assert st1["no_correlation"]["domain (eta)"] == "constant weights: no correlation"
    assert st1["no_correlation"]["domain = a vs rest"] == "constant weights: no correlation"
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    corr = html[html.index("<h2>Correlations</h2>"):html.index("<h2>Weight distribution</h2>")]
    assert "nan" not in corr.lower()
    assert corr.count("constant: no correlation") == 2 and "constant weights: no correlation" in corr
    fig = plot_correlations([run_summary(run, 1, 20)], tmp_path / "c.png")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "length (tokens): constant: no correlation" in legend
    assert "LM loss (constant weights: no correlation at stage 1)" in legend


def test_log_ticks_by_hand():
    from dwm.analysis.report import log_ticks

    assert log_ticks(0.5, 2) == [0.5, 1, 2]
    assert log_ticks(0.23, 4.3) == [0.3, 0.5, 1, 2, 3]  # 1-2-3-5 where it gives at most 5
    assert log_ticks(0.15, 6) == [0.2, 0.5, 1, 2, 5]  # 1-2-3-5 would be 7
    assert log_ticks(0.01, 30) == [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30]  # 1-2-5 would be 11 ticks
    assert log_ticks(1e-6, 1e3) == [1e-6, 1e-4, 0.01, 1, 100]  # 10 powers of ten: every other one
    assert log_ticks(0.9, 1.1) == [0.9, 0.95, 1, 1.05, 1.1]  # only 1 of 1-2-5 inside: round linear steps


def test_weight_distribution_log_axis_labels_do_not_overlap(tmp_path):
    """Weights over five decades on a log axis: the labelled y ticks are few (2..8) and no two labels overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from dwm.analysis.report import plot_weight_distribution, run_summary

    rng = np.random.default_rng(2)
    w = [np.exp(rng.uniform(np.log(1e-3), np.log(50), 40)) for _ in range(3)]
    run = _TextRun.make(w, rng.integers(5, 40, 40))
    fig = plot_weight_distribution([run], [run_summary(run, 1, 20)], tmp_path / "w.png")
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    labels = [t for t in ax.get_yticklabels(which="both") if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert 2 <= len(labels) <= 8, [t.get_text() for t in labels]
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.y0)
    for a, b in itertools.pairwise(boxes):
        assert a.y1 <= b.y0, "tick labels overlap"
