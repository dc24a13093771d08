"""dwm's LAMBADA numbers equal lm-evaluation-harness's on the same exported model and file, offline."""

from __future__ import annotations

import math

import pytest
from eval_helpers import make_passages, make_run, write_jsonl

from dwm.data.passages import split_context_target
from dwm.errors import UserError
from dwm.eval.export import export_run, load_run_tokenizer
from dwm.eval.harness import local_task_dir, local_task_names, run_harness
from dwm.eval.lambada import encode_pair, lambada_eval, make_encoder, prefix_token_id, score_pairs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    passages = make_passages(20, seed=1)
    target = write_jsonl(passages, root / "target.jsonl")
    run = make_run(root, passages)
    hf = root / "hf"
    export_run(run, hf)
    return run, hf, target, passages


def test_local_tasks_shipped_and_bound_to_target(tmp_path):
    import yaml

    assert "dwm_lambada" in local_task_names()
    target = write_jsonl(["a b c"], tmp_path / "t.jsonl")
    with local_task_dir(target) as d:
        cfg = yaml.safe_load((d / "dwm_lambada.yaml").read_text())
    assert cfg["dataset_path"] == "json"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(target.resolve())
    # lm-eval's lambada_openai semantics, verbatim
    assert cfg["doc_to_text"] == "{{text.split(' ')[:-1]|join(' ')}}"
    assert cfg["doc_to_target"] == "{{' '+text.split(' ')[-1]}}"
    assert [m["metric"] for m in cfg["metric_list"]] == ["perplexity", "acc"]
    assert not d.exists()  # temporary


@pytest.mark.slow
def test_lambada_eval_equals_lm_eval(exported):
    run, hf, target, passages = exported
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    ours = lambada_eval(model, tok, target, batch_size=4)
    theirs = run_harness(hf, ["dwm_lambada"], target=target, batch_size=4, log_samples=True)
    res = theirs["results"]["dwm_lambada"]
    assert ours["n"] == len(passages) == len(theirs["samples"]["dwm_lambada"])
    assert 0 < ours["acc"] < 1, "the fixture model should hit some targets and miss others"
    assert ours["acc"] == res["acc"]
    assert ours["acc_stderr"] == pytest.approx(res["acc_stderr"], rel=1e-9)
    assert ours["perplexity"] == pytest.approx(res["perplexity"], rel=1e-4)

    # per passage: same summed log-prob and greedy flag (some passages exceed the 64-token context)
    encode, prefix = make_encoder(tok), prefix_token_id(tok)
    pairs = [encode_pair(encode, *split_context_target(p), prefix) for p in passages]
    assert max(len(c) + len(t) for c, t in pairs) > 64
    scored = score_pairs(model, pairs, batch_size=4)
    for s in theirs["samples"]["dwm_lambada"]:
        ll, greedy = s["filtered_resps"][0]
        mine = scored[s["doc_id"]]
        assert s["doc"]["text"] == passages[s["doc_id"]]
        assert mine[1] == greedy
        assert mine[0] == pytest.approx(ll, rel=1e-4, abs=1e-5)
    # and with the raw `tokenizers` file of the run (what `dwm eval` uses before any export)
    ours_raw = lambada_eval(model, load_run_tokenizer(run), target, batch_size=3)
    assert ours_raw["acc"] == ours["acc"]
    assert math.isclose(ours_raw["perplexity"], ours["perplexity"], rel_tol=1e-5)


def test_harness_errors(exported, tmp_path):
    _run, hf, target, _ = exported
    with pytest.raises(UserError, match="need a target"):
        run_harness(hf, ["dwm_lambada"], target=None)
    with pytest.raises(UserError, match="target file not found"):
        run_harness(hf, ["dwm_lambada"], target=tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="config.json"):
        run_harness(tmp_path, ["dwm_lambada"], target=target)
    with pytest.raises(UserError, match="unknown lm-eval task"):
        run_harness(hf, ["no_such_task_xyz"], include_defaults=False)
    # a pass-through task whose dataset lives on the hub: a clear UserError offline, not a traceback
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "hubtask.yaml").write_text(
        "task: hub_lambada\ndataset_path: EleutherAI/lambada_openai\ndataset_name: default\n"
        "output_type: loglikelihood\ntest_split: test\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    with pytest.raises(UserError, match="hub"):
        run_harness(hf, ["hub_lambada"], include_path=[inc], include_defaults=False)


@pytest.mark.slow
def test_few_shot_prompts_and_scores(exported):
    """num_fewshot=K (`dwm eval --tasks dwm_lambada:K`): every prompt is K *other* passages of the file (never the
    passage itself: its answer would be in the prompt), then the passage's own context; lm-eval's log-likelihood
    of the last word equals ours on that prompt."""
    _run, hf, target, passages = exported
    from transformers import AutoModelForCausalLM, AutoTokenizer

    K = 2
    theirs = run_harness(hf, ["dwm_lambada"], target=target, batch_size=4, log_samples=True, num_fewshot=K)
    samples = theirs["samples"]["dwm_lambada"]
    assert len(samples) == len(passages)
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    encode, prefix = make_encoder(tok), prefix_token_id(tok)
    # a shot is lm-eval's doc_to_text + target_delimiter " " + doc_to_target, whose target already starts with a
    # space: the passage with a double space before its last word (lm-eval's lambada_openai does this)
    as_shot = {" ".join(split_context_target(p)): p for p in passages}
    pairs, lls = [], []
    for s in samples:
        own = passages[s["doc_id"]]
        context, word = s["arguments"][0][0], s["arguments"][0][1]
        ctx, tgt = split_context_target(own)
        assert word == tgt
        shots, _, tail = context.rpartition("\n\n")  # lm-eval's default fewshot_delimiter
        assert tail == ctx
        shots = shots.split("\n\n")
        assert len(shots) == K and all(x in as_shot and as_shot[x] != own for x in shots)
        pairs.append(encode_pair(encode, context, tgt, prefix))
        lls.append(s["filtered_resps"][0][0])
    scored = score_pairs(model, pairs, batch_size=4)
    for (ll, _greedy), theirs_ll in zip(scored, lls, strict=True):
        assert ll == pytest.approx(theirs_ll, rel=1e-4, abs=1e-5)
    zero = run_harness(hf, ["dwm_lambada"], target=target, batch_size=4)["results"]["dwm_lambada"]
    assert theirs["results"]["dwm_lambada"]["perplexity"] != zero["perplexity"]  # the shots reached the model
