"""LAMBADA and held-out numbers against hand computations; `dwm eval` outputs and error cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import make_passages, make_run, write_jsonl

from dwm.cli import main
from dwm.data.dataset import PreparedData
from dwm.data.passages import split_context_target
from dwm.errors import UserError
from dwm.eval.cli import evaluate_run, format_table
from dwm.eval.export import load_run_model, load_run_tokenizer, resolve_checkpoint
from dwm.eval.heldout import heldout_eval
from dwm.eval.lambada import encode_pair, lambada_eval
from dwm.testing import make_synthetic_prepared


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A prepared dir (3 domains), a run trained with its tokenizer, and a LAMBADA target file."""
    root = tmp_path_factory.mktemp("eval")
    data = make_synthetic_prepared(root / "prep", n_train=8, n_val=15, seq_len=32, domains=("a", "b", "c"))
    passages = make_passages(12, seed=3)
    target = write_jsonl(passages, root / "target" / "heldout.jsonl")
    run = make_run(root, passages, train_steps=30, tokenizer_json=data / "tokenizer.json", data_dir=data)
    model = load_run_model(resolve_checkpoint(run)[0])
    return {"root": root, "data": data, "run": run, "target": target, "passages": passages, "model": model,
            "tok": load_run_tokenizer(run)}


def test_encode_pair_rules():
    enc = lambda s: [ord(c) for c in s]  # a character-level "tokenizer"
    assert encode_pair(enc, "a b", " c", 0) == ([97, 32, 98], [32, 99])
    # trailing spaces of the context move to the continuation
    assert encode_pair(enc, "a b ", "c", 0) == ([97, 32, 98], [32, 99])
    # an empty context becomes the prefix token, unless the continuation already starts with it
    assert encode_pair(enc, "", " c", 7) == ([7], [32, 99])
    assert encode_pair(enc, "", " c", 32) == ([32], [99])
    assert split_context_target("one two  three") == ("one two ", " three")


def _hand_lambada(model, tok, passage: str, max_len: int) -> tuple[float, bool]:
    context, target = split_context_target(passage)
    ctx = tok.encode(context)
    whole = tok.encode(context + target)
    cont = whole[len(ctx):]
    inp = whole[-(max_len + 1):][:-1]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([inp])).logits[0].float(), -1)
    rows = logp[len(inp) - len(cont):]
    tgt = torch.tensor(cont)
    return float(rows[torch.arange(len(cont)), tgt].sum()), bool((rows.argmax(-1) == tgt).all())


@pytest.mark.parametrize("max_len", [1024, 24])
def test_lambada_matches_hand_computation(setup, max_len):
    model, tok, passages = setup["model"], setup["tok"], setup["passages"]
    hand = [_hand_lambada(model, tok, p, max_len) for p in passages]
    got = lambada_eval(model, tok, setup["target"], batch_size=5, max_length=max_len)
    acc = sum(h for _, h in hand) / len(hand)
    assert got["n"] == len(passages)
    assert got["acc"] == acc
    assert got["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in hand])), rel=1e-5)
    sd = np.std([float(h) for _, h in hand], ddof=1) / math.sqrt(len(hand))
    assert got["acc_stderr"] == pytest.approx(sd, abs=1e-12)
    # passages given directly (str or {"text": ...}) and --max-passages
    assert lambada_eval(model, tok, [{"text": p} for p in passages], batch_size=2,
                        max_length=max_len)["perplexity"] == pytest.approx(got["perplexity"], rel=1e-5)
    assert lambada_eval(model, tok, passages, max_passages=4, max_length=max_len)["n"] == 4


def test_heldout_matches_hand_computation(setup):
    model, data_dir = setup["model"], setup["data"]
    got = heldout_eval(model, data_dir, batch_size=4)
    val = PreparedData(data_dir, "val")
    nll_sum: dict[str, float] = {}
    count: dict[str, int] = {}
    for i in range(len(val)):
        n = int(val.n_tokens[i])
        ids = torch.tensor(np.asarray(val.tokens[i, :n], dtype=np.int64))[None]
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        dom = val.domains[val.domain_ids[i]]
        nll_sum[dom] = nll_sum.get(dom, 0.0) + float(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
        count[dom] = count.get(dom, 0) + n - 1
    assert sorted(got["per_domain"]) == ["a", "b", "c"]
    for dom, r in got["per_domain"].items():
        assert r["n_tokens"] == count[dom]
        assert r["loss"] == pytest.approx(nll_sum[dom] / count[dom], rel=1e-5)
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
    overall = sum(nll_sum.values()) / sum(count.values())
    assert got["overall"]["loss"] == pytest.approx(overall, rel=1e-5)
    assert got["overall"]["n_samples"] == got["n_samples"] == len(val) == 15
    assert heldout_eval(model, data_dir, max_samples=5)["n_samples"] == 5


def test_evaluate_run_writes_eval_json(setup, tmp_path):
    run, target = setup["run"], setup["target"]
    res = evaluate_run(run, target=target, batch_size=4, max_passages=10)  # data dir from config.toml
    saved = json.loads((run / "eval.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["checkpoint"] == "step_00000010" and saved["step"] == 10
    assert saved["tokens_seen"] == 1001  # from metrics.jsonl
    assert saved["data_dir"] == str(setup["data"])
    assert saved["lambada"]["n"] == 10 and saved["lambada"]["target"] == str(target)
    direct = lambada_eval(setup["model"], setup["tok"], target, batch_size=4, max_passages=10)
    assert saved["lambada"]["acc"] == direct["acc"]
    assert saved["lambada"]["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert saved["heldout"]["overall"]["loss"] == pytest.approx(
        heldout_eval(setup["model"], setup["data"])["overall"]["loss"], rel=1e-6)

    # without metrics.jsonl: tokens = step * train.global_batch_tokens; no target: no LAMBADA section
    (run / "metrics.jsonl").rename(tmp_path / "metrics.jsonl")
    try:
        res2 = evaluate_run(run, data_dir=setup["data"], target=None, write=False)
    finally:
        (tmp_path / "metrics.jsonl").rename(run / "metrics.jsonl")
    assert res2["tokens_seen"] == 10 * 128 and "lambada" not in res2

    table = format_table({"uniform": res, "dwm": res2})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "uniform", "dwm"]
    acc_row = next(line for line in lines if line.startswith("LAMBADA acc"))
    assert acc_row.split()[-2:] == [f"{res['lambada']['acc']:.4f}", "-"]
    for dom in ("a", "b", "c"):
        assert any(line.startswith(f"val loss [{dom}]") for line in lines)


def test_eval_cli(setup, capsys):
    run = setup["run"]
    rc = main(["eval", str(run), "--target", str(setup["target"]), "--max-passages", "3", "--batch-size", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "LAMBADA acc" in out and "val loss [all]" in out
    assert json.loads((run / "eval.json").read_text())["lambada"]["n"] == 3


def test_eval_errors(setup, tmp_path, capsys):
    run, data = setup["run"], setup["data"]
    with pytest.raises(UserError, match="run directory not found"):
        evaluate_run(tmp_path / "missing", target=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint"):
        evaluate_run(tmp_path / "empty", target=None)
    with pytest.raises(UserError, match="target file not found"):
        evaluate_run(run, target=tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine passage here"}\n{not json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        evaluate_run(run, target=bad, write=False)
    # the reference set is what DWM optimised against: refused unless explicitly allowed
    ref = write_jsonl(setup["passages"][:3], tmp_path / "reference.jsonl")
    with pytest.raises(UserError, match="reference"):
        evaluate_run(run, target=ref, write=False)
    assert evaluate_run(run, target=ref, allow_reference=True, write=False)["lambada"]["n"] == 3
    with pytest.raises(UserError, match="prepared data directory not found"):
        evaluate_run(run, data_dir=tmp_path, target=None)
    with pytest.raises(UserError, match="checkpoint 'step_00000099' has no model"):
        evaluate_run(run, checkpoint="step_00000099", target=None)
    with pytest.raises(UserError, match=r"task 'dwm_lambada:five': the shot count .* \(e.g. dwm_lambada:5\)"):
        evaluate_run(run, target=None, tasks=["dwm_lambada:five"], write=False)
    capsys.readouterr()
    assert main(["eval", str(run), "--target", str(ref)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dwm eval: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert data.is_dir()


def test_passage_loss_matches_hand_computation(setup):
    """Mean over passages of each passage's mean next-token NLL, one passage at a time, no padding."""
    import torch.nn.functional as F

    from dwm.eval.lambada import passage_loss

    model, tok = setup["model"], setup["tok"]
    want = []
    with torch.no_grad():
        for p in setup["passages"]:
            ids = torch.tensor([tok.encode(p.strip(), add_special_tokens=False)[:model.config.max_position_embeddings]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            want.append(float(F.cross_entropy(logits, ids[0, 1:])))
    got = passage_loss(model, tok, setup["target"], batch_size=5)
    assert got == pytest.approx(sum(want) / len(want), rel=1e-5)


def test_empty_val_split_still_reports_the_target(setup, tmp_path, capsys):
    """A small input prepared with the default --val-fraction has an empty val split: eval still reports the
    target it was asked for and says that (and why) the held-out loss was skipped."""
    import shutil

    import pyarrow.parquet as pq

    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    pq.write_table(pq.read_table(data / "val.parquet").slice(0, 0), data / "val.parquet")
    (data / "val.bin").write_bytes(b"")
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["val"]["n_samples"] = 0
    (data / "meta.json").write_text(json.dumps(meta))
    res = evaluate_run(setup["run"], data_dir=data, target=setup["target"], write=False)
    assert res["lambada"]["n"] == len(setup["passages"])
    assert res["heldout"]["n_samples"] == 0 and "is empty" in res["heldout"]["skipped"]
    assert "held-out loss skipped" in capsys.readouterr().err
    assert main(["eval", str(setup["run"]), "--data", str(data), "--target", str(setup["target"])]) == 0
    out = capsys.readouterr().out
    assert "skipped (empty split)" in out and "LAMBADA acc" in out
