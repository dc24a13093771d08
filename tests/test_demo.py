"""`dwm demo` end to end on a toy corpus: prepare, uniform / DWM / static-oracle runs on the same budget, all
evaluated, the DWM's stage-by-stage domain weights and a one-line summary computed from the run's files."""

from __future__ import annotations

import json
import random

import pytest

from dwm.cli import main

WORDS = {"books": ["the", "lady", "walked", "slowly", "towards", "the", "house", "and", "smiled", "at", "her", "sister"],
         "code": ["def", "return", "import", "class", "self", "value", "list", "print", "range", "index", "for", "while"]}


@pytest.mark.slow
def test_demo_trains_both_and_prints_side_by_side(tmp_path, capsys):
    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for dom, words in WORDS.items():
        with open(corpus / f"{dom}__toy.jsonl", "w") as f:
            f.writelines(json.dumps({"id": f"{dom}{i}", "text": " ".join(rng.choices(words, k=80))}) + "\n" for i in range(40))
    passages = [" ".join(rng.choices(WORDS["books"], k=30)) + " sister" for _ in range(12)]
    for name in ("reference", "heldout"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--corpus", str(corpus), "--reference", str(tmp_path / "reference.jsonl"),
               "--heldout", str(tmp_path / "heldout.jsonl"), "--preset", "tiny", "--steps", "5", "--vocab-size",
               "300", "--seq-len", "32", "--batch-tokens", "256", "--max-passages", "6", "--jobs", "1",
               "--threads", "1", "log.progress=false", "weighting.probe_size=20", "weighting.net.width=32", "weighting.ref_batch_size=4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "uniform" in text and "dwm" in text and "oracle (books=1.0)" in text and "LAMBADA acc" in text
    results = json.loads((out / "results.json").read_text())
    assert results["threads_per_run"] == 1 and results["jobs"] == 1
    assert "1 run at a time, 1 torch thread each" in (out / "results.md").read_text().splitlines()[0]
    assert results["uniform"]["tokens_seen"] == results["dwm"]["tokens_seen"] == results["oracle"]["tokens_seen"]
    assert results["uniform"]["tokens_seen"] == 5 * 256
    # the stage table and the sentence come from this run's probe files and eval results, not from constants
    weights = results["stage_weights"]
    assert len(weights) == 5 and set(weights[0]) == {"books", "code"}
    assert f"{weights[4]['books']:.2f}" in text.split("stage by stage")[1]
    # what it learned from: the stage's probed samples' mean signal per domain, from signal/stage_k.parquet
    import pyarrow.parquet as pq

    said = text.split("What it learned from")[1]
    assert sorted(results["stage_signal"]) == ["0", "1", "2", "3", "4"]
    for k in range(5):
        t = pq.read_table(out / "dwm" / "signal" / f"stage_{k}.parquet").to_pydict()
        for d in {"books", "code"} & set(t["domain"]):
            v = [x for x, dd in zip(t["signal"], t["domain"]) if dd == d]
            assert abs(results["stage_signal"][str(k)][d] - sum(v) / len(v)) < 1e-12
        row = said.splitlines()[3 + k].split()
        assert row[0] == str(k) and row[1:] == [f"{results['stage_signal'][str(k)][d]:+.2f}"
                                                if d in results["stage_signal"][str(k)] else "-"
                                                for d in ("books", "code")]
    loss = {a: results[a]["lambada"]["passage_loss"] for a in ("uniform", "dwm", "oracle")}
    assert f"by {abs(loss['dwm'] - loss['uniform']):.3f} nats against uniform" in text
    assert text.strip().splitlines()[-1].startswith("DWM learned to favour")
    # what the DWM run trained on, from its metrics.jsonl: the shares of every logged step sum to 1
    steps = [json.loads(x) for x in (out / "dwm" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    shares = results["trained_share"]
    assert set(shares) == {"books", "code"} and abs(sum(shares.values()) - 1) < 1e-9
    assert abs(shares["books"] - sum(r.get("share/books", 0.0) for r in steps) / len(steps)) < 1e-12
    assert f"{shares['books']:.3f}" in text.split("trained share")[1].splitlines()[1]
    # the oracle trained on its manifest: books only
    from dwm.data.dataset import PreparedData

    ids = pq.read_table(out / "oracle_mixture.parquet").column("sample_id").to_numpy()
    data = PreparedData(out / "data", "train")
    assert {data.domains[d] for d in data.domain_ids[ids]} == {"books"}
    assert results["corpus_share"] == {d: float((data.domain_ids == i).mean()) for i, d in enumerate(data.domains)}
    assert (out / "dwm" / "weighting" / "stage_4.safetensors").is_file()
    assert not (out / "uniform" / "weighting").exists()
    # a second run finds everything done and trains nothing again
    mtime = (out / "dwm" / "checkpoints" / "LATEST").stat().st_mtime
    assert main(["demo", "--out", str(out), "--corpus", str(corpus), "--reference", str(tmp_path / "reference.jsonl"),
                 "--heldout", str(tmp_path / "heldout.jsonl"), "--preset", "tiny", "--steps", "5", "--vocab-size",
                 "300", "--seq-len", "32", "--batch-tokens", "256", "--max-passages", "6", "--jobs", "1"]) == 0
    assert (out / "dwm" / "checkpoints" / "LATEST").stat().st_mtime == mtime


def test_thread_layout_is_fixed_by_the_machine(tmp_path, capsys):
    """Each run's torch threads: --threads, else the cores shared by the runs training at once (at least 1); never
    changed while the runs train (no dependence on which run finishes first). A negative count is a one-line
    error, before anything is prepared."""
    from dwm.demo import threads_per_run

    assert threads_per_run(cores=2, jobs=3) == 1  # this project's VMs: the DWM benchmark's layout
    assert threads_per_run(cores=2, jobs=1) == 2
    assert threads_per_run(cores=16, jobs=3) == 5
    assert threads_per_run(cores=16, jobs=3, threads=1) == 1
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "a b"}) + "\n")
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--corpus", str(corpus), "--reference",
               str(tmp_path / "t.jsonl"), "--heldout", str(tmp_path / "t.jsonl"), "--threads", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--threads must be >= 0" in err
    assert not (tmp_path / "demo").exists()
