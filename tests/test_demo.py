"""`dwm demo` end to end on a toy corpus: prepare, uniform and DWM runs on the same budget, both evaluated."""

from __future__ import annotations

import json
import random

from dwm.cli import main

WORDS = {"books": ["the", "lady", "walked", "slowly", "towards", "the", "house", "and", "smiled", "at", "her", "sister"],
         "code": ["def", "return", "import", "class", "self", "value", "list", "print", "range", "index", "for", "while"]}


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
               "300", "--seq-len", "32", "--batch-tokens", "256", "--max-passages", "6", "log.progress=false",
               "weighting.probe_size=20", "weighting.net.width=32", "weighting.ref_batch_size=4"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "uniform" in table and "dwm" in table and "LAMBADA acc" in table
    results = json.loads((out / "results.json").read_text())
    assert results["uniform"]["tokens_seen"] == results["dwm"]["tokens_seen"] == 5 * 256
    assert (out / "dwm" / "weighting" / "stage_4.safetensors").is_file()
    assert not (out / "uniform" / "weighting").exists()
    # a second run finds everything done and trains nothing again
    mtime = (out / "dwm" / "checkpoints" / "LATEST").stat().st_mtime
    assert main(["demo", "--out", str(out), "--corpus", str(corpus), "--reference", str(tmp_path / "reference.jsonl"),
                 "--heldout", str(tmp_path / "heldout.jsonl"), "--preset", "tiny", "--steps", "5", "--vocab-size",
                 "300", "--seq-len", "32", "--batch-tokens", "256", "--max-passages", "6"]) == 0
    assert (out / "dwm" / "checkpoints" / "LATEST").stat().st_mtime == mtime
