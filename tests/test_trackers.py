"""Experiment trackers (log.tracker): the numbers of every metrics.jsonl record reach TensorBoard event files (read
back with TensorBoard's own reader) and a wandb offline run; a missing package is a one-line error."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

from dwm.cli import main
from dwm.errors import UserError
from dwm.run import build_trainer, load_config
from dwm.train.trackers import flatten_record


@pytest.fixture(scope="module")
def ref(tmp_path_factory, prepared_dir) -> Path:
    """A tiny LAMBADA-format reference set cut from the synthetic val split (for DWM runs)."""
    from tokenizers import Tokenizer

    from dwm.data.dataset import PreparedData

    tok = Tokenizer.from_file(str(prepared_dir / "tokenizer.json"))
    val = PreparedData(prepared_dir, "val")
    path = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    path.write_text("".join(json.dumps({"text": tok.decode(val.tokens[i, : val.n_tokens[i]].tolist())[:160]}) + "\n"
                            for i in range(8)))
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_flatten_record():
    step, s = flatten_record({"step": 3, "loss": 2.5, "w_domain/a": 1.25, "tokens_seen": 256})
    assert step == 3 and s == {"loss": 2.5, "w_domain/a": 1.25, "tokens_seen": 256.0}
    step, s = flatten_record({"step": 4, "event": "stage", "stage": 1, "probe_weight_by_domain": {"a": 0.5, "b": 2},
                              "ok": True, "reason": "", "source": None, "ids": [1, 2]})
    assert step == 4 and s == {"stage/stage": 1.0, "stage/probe_weight_by_domain/a": 0.5,
                               "stage/probe_weight_by_domain/b": 2.0, "stage/ok": 1.0}
    _, s = flatten_record({"step": 0, "event": "diagnose", "when": "after", "capture_spearman": math.nan})
    assert list(s) == ["diagnose/after/capture_spearman"] and math.isnan(s["diagnose/after/capture_spearman"])


def test_tensorboard_has_every_number_of_metrics_jsonl(make_cfg, ref, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb_run"
    cfg = make_cfg("log.tracker=tensorboard", "weighting.mode=dwm", f"weighting.reference={ref}",
                   "weighting.advanced.updates_per_stage=1", "weighting.probe_size=16",
                   "weighting.advanced.ref_batch_size=4", "weighting.net.width=32", "weighting.net.heads=2",
                   "weighting.advanced.diagnostics=true", "weighting.advanced.diagnostics_size=8", "weighting.stages=2",
                   "weighting.apply=weights", out=run)  # in-batch weights: the w_* statistics are logged
    build_trainer(cfg).train()
    files = list((run / "tb").glob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    recs = records(run)
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 4
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    # every number of every record is there, events under their name (and `when`)
    for r in recs:
        step, scalars = flatten_record(r)
        for tag, x in scalars.items():
            assert tag in tags, tag
            got = [e.value for e in acc.Scalars(tag) if e.step == step]
            assert any((math.isnan(x) and math.isnan(g)) or g == pytest.approx(x, rel=1e-6, abs=1e-30)
                       for g in got), (tag, step, x, got)
    for tag in ("bilevel/ref_loss_before", "stage/probe_weight_by_domain/a", "diagnose/before/capture_spearman",
                "diagnose/after/capture_spearman", "w_domain/a", "dwm_attach/stages"):
        assert tag in tags, tag


def test_tensorboard_resume_hides_the_rerun_steps(make_cfg, tmp_path):
    """Crashed after step 3 (checkpoint at 2), resumed: TensorBoard shows each step's loss once, as metrics.jsonl."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dwm.train.callbacks import Callback

    class Crash(Callback):
        def on_step_end(self, ctx, metrics):
            if ctx.step == 3:
                raise RuntimeError("crash")

    run = tmp_path / "resumed"
    over = ("log.tracker=tensorboard", "checkpoint.every=2")
    t = build_trainer(make_cfg(*over, out=run), callbacks=[Crash()])
    with pytest.raises(RuntimeError, match="crash"):
        t.train()
    t.callbacks[-1].on_train_end(t.ctx)  # as if its events had been flushed before the crash
    build_trainer(make_cfg(*over, out=run), resume=True).train()
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    want = [(r["step"], r["loss"]) for r in records(run) if "loss" in r]
    assert [s for s, _ in want] == [1, 2, 3, 4]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(s, pytest.approx(x, rel=1e-6)) for s, x in want]


@pytest.mark.slow
def test_wandb_offline_writes_its_run_dir(make_cfg, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "wb_run"
    build_trainer(make_cfg("log.tracker=wandb", "log.tracker_project=dwm-test", out=run)).train()
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the history rows carry the metrics' keys and values (json-encoded floats inside protobuf records); wandb's
    # service writes the run file asynchronously, even after run.finish() returned
    steps = [r for r in records(run) if "loss" in r]

    def written() -> bool:
        blob = b"".join(p.read_bytes() for p in runs[0].glob("run-*.wandb"))
        return (b"tokens_per_s" in blob and b"loss_mean" in blob
                and sum(json.dumps(r["loss"]).encode() in blob for r in steps) >= len(steps) - 1)

    deadline = time.monotonic() + 60
    while not written() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert written()


@pytest.mark.parametrize("tracker,module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_missing_tracker_package_is_one_line(tracker, module, prepared_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    with pytest.raises(UserError, match=f"pip install 'dwm-llm\\[{tracker}\\]'"):
        build_trainer(load_config(None, ["model.spec=tiny", f"data.dir={prepared_dir}", f"out={tmp_path / 'r'}",
                                         "train.max_steps=1", "train.global_batch_tokens=256",
                                         f"log.tracker={tracker}"]))
    assert not (tmp_path / "r").exists()  # refused before the trainer made the run dir
    rc = main(["train", "--data", str(prepared_dir), "--out", str(tmp_path / "r"), "model.spec=tiny",
               "train.max_steps=1", "train.global_batch_tokens=256", f"log.tracker={tracker}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err and f"dwm-llm[{tracker}]" in err


def test_unknown_tracker_is_rejected(make_cfg):
    with pytest.raises(UserError, match="log.tracker"):
        build_trainer(make_cfg("log.tracker=mlflow"))
