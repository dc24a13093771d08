"""Any supported Hugging Face causal LM as `model.spec=DIR` (llama, qwen2, gpt2, gpt_neox, olmo), and the BOS policy
(tokens as the model will see them: prepare, reference passages, eval and export agree)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dwm.cli import main
from dwm.data.dataset import PreparedData
from dwm.errors import UserError
from dwm.run import build_trainer, load_config
from dwm.testing import make_synthetic_prepared
from dwm.train.model import HF_MODEL_TYPES, build_model, tied_parameter_names

# Tiny shapes of each architecture (no dropout, so gradients compare exactly); vocab_size is added per test.
ARCHS: dict[str, dict] = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": False},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": 64, "rotary_pct": 0.5},
    "olmo": {"model_type": "olmo", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 64, "tie_word_embeddings": False},
}
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
           "gpt_neox": "GPTNeoXForCausalLM", "olmo": "OlmoForCausalLM"}
SEQ = 32


def model_dir(root: Path, arch: str, vocab: int, **over) -> Path:
    """A Hugging Face model directory holding only config.json (special ids inside the tiny vocabulary)."""
    d = root / f"hf-{arch}"
    d.mkdir(parents=True, exist_ok=True)
    cfg = {**ARCHS[arch], "vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None, **over}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def write_ref(tok, data: Path, path: Path, n: int = 12) -> Path:
    """Reference passages decoded from validation rows (text the tokenizer covers)."""
    val = PreparedData(data, "val")
    with open(path, "w") as f:
        for i in range(n):
            ids = [t for t in val.tokens[i, : val.n_tokens[i]].tolist() if t != val.bos_id]
            f.write(json.dumps({"text": tok.decode(ids)[:160].strip()}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("hf")
    d = make_synthetic_prepared(root / "data", n_train=64, n_val=16, seq_len=SEQ, vocab_size=300)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    return {"data": d, "root": root, "vocab": PreparedData(d).vocab_size,
            "ref": write_ref(tok, d, root / "ref.jsonl")}


def overrides(data_dir: Path, out: Path, spec: str, *extra: str) -> list[str]:
    return [f"data.dir={data_dir}", f"out={out}", f"model.spec={spec}", "train.global_batch_tokens=256",
            "train.micro_batch_size=4", "train.max_steps=3", "log.progress=false", "log.every=1",
            "checkpoint.every=0", "optim.warmup_steps=1", "train.device=cpu", *extra]


def train(data_dir: Path, out: Path, spec: str, *extra: str, resume: bool = False):
    t = build_trainer(load_config(None, overrides(data_dir, out, spec, *extra)), resume=resume)
    t.train()
    return t


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------------------------- building
@pytest.mark.parametrize("arch", HF_MODEL_TYPES)
def test_scratch_is_seeded_and_leaves_global_rng(arch, tmp_path):
    d = model_dir(tmp_path, arch, 300)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(str(d), 300, seed=1, max_seq_len=SEQ)
    assert torch.equal(torch.rand(3), expected)  # the global RNG was not touched
    b = build_model(str(d), 300, seed=1, max_seq_len=SEQ)
    c = build_model(str(d), 300, seed=2, max_seq_len=SEQ)
    assert type(a).__name__ == CLASSES[arch] and a.config.model_type == arch and not a.config.use_cache
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.get_input_embeddings().weight, c.get_input_embeddings().weight)
    tied = tied_parameter_names(a)
    if a.config.tie_word_embeddings:
        assert len(tied) == 1 and "lm_head.weight" in tied[0]
    else:
        assert tied == []


def test_init_pretrained_scratch_auto(tmp_path):
    d = model_dir(tmp_path, "gpt2", 300)
    src = build_model(str(d), 300, seed=3)
    with torch.no_grad():  # weights no fresh init produces
        for p in src.parameters():
            p.add_(0.5)
    src.save_pretrained(tmp_path / "w")
    for init in ("auto", "pretrained"):
        m = build_model(str(tmp_path / "w"), 300, init=init, seed=0)
        assert all(torch.equal(p, q) for p, q in zip(src.parameters(), m.parameters(), strict=True)), init
    fresh = build_model(str(tmp_path / "w"), 300, init="scratch", seed=3)
    ref = build_model(str(d), 300, seed=3)  # same architecture and seed, no weights: same init
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), fresh.parameters(), strict=True))
    with pytest.raises(UserError, match="has no weights"):
        build_model(str(d), 300, init="pretrained")
    with pytest.raises(UserError, match="is a preset"):
        build_model("tiny", 300, init="pretrained")
    # a pretrained model's embedding may be padded past its tokenizer's vocabulary
    assert build_model(str(tmp_path / "w"), 290).config.vocab_size == 300


@pytest.mark.parametrize("arch", HF_MODEL_TYPES)
def test_activation_checkpointing_same_gradients(arch, tmp_path):
    m = build_model(str(model_dir(tmp_path, arch, 97)), 97, seed=0, dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    m.train()

    def grads():
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in m.parameters()]

    plain = grads()
    m.gradient_checkpointing_enable()
    assert m.is_gradient_checkpointing
    ckpt = grads()
    for g, h in zip(plain, ckpt, strict=True):
        assert torch.allclose(g, h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", HF_MODEL_TYPES)
def test_fd_and_exact_hypergradients_agree(arch, tmp_path):
    from dwm.nn.bilevel import hypergradient

    V, B, T = 97, 6, 14
    m = build_model(str(model_dir(tmp_path, arch, V)), V, seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (B, T), generator=g)
    n = torch.randint(4, T + 1, (B,), generator=g)
    n[0] = T
    ids[torch.arange(T)[None] >= n[:, None]] = 0
    w = 0.2 + 1.6 * torch.rand(B, generator=g, dtype=torch.float64)
    w = w * B / w.sum()
    ref = torch.randint(2, V, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, 8:] = False
    before = {k: v.clone() for k, v in m.state_dict().items()}
    attn = m.config._attn_implementation
    # float64 and a step 3e-3 (default 1e-2): the central difference's O(eps^2) error stays well under the
    # tolerance for every architecture (measured rel 1e-5..7e-5; GPT-NeoX has 8e-4 at the default step)
    fd = hypergradient(m, ids, n, w, ref, mask, lr=0.5, backend="fd", fd_eps=3e-3)
    ex = hypergradient(m, ids, n, w, ref, mask, lr=0.5, backend="exact")
    assert fd.ok and ex.ok
    assert m.config._attn_implementation == attn  # eager only during the exact call
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    cos = float(torch.nn.functional.cosine_similarity(fd.dL_dw, ex.dL_dw, dim=0))
    rel = float((fd.dL_dw - ex.dL_dw).norm() / ex.dL_dw.norm())
    assert cos >= 0.99999 and rel < 3e-4, (cos, rel)
    assert float(ex.dL_dw.abs().max()) > 0


# ---------------------------------------------------------------------------------- training and export
@pytest.mark.parametrize("arch", HF_MODEL_TYPES)
def test_train_and_export_round_trip(arch, data, tmp_path):
    from transformers import AutoModelForCausalLM

    from dwm.eval.export import export_run, load_run_model, resolve_checkpoint

    spec = model_dir(tmp_path, arch, data["vocab"])
    run = tmp_path / "run"
    t = train(data["data"], run, str(spec))
    assert type(t.model).__name__ == CLASSES[arch]
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 3 and all(np.isfinite(losses))
    out = tmp_path / "hf"
    info = export_run(run, out)
    ckpt, _ = resolve_checkpoint(run)
    ids = torch.randint(0, data["vocab"], (2, SEQ), generator=torch.Generator().manual_seed(0))
    exp = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exp).__name__ == CLASSES[arch]
    assert torch.equal(logits(load_run_model(ckpt), ids), logits(exp, ids))
    # the trained BPE has no BOS token: the export names none (not the architecture's default id)
    assert exp.config.bos_token_id is None and info["bos_token"] is None and info["add_bos_token"] is False
    assert exp.config.eos_token_id == PreparedData(data["data"]).eos_id


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_resume_restores_tied_and_untied_models_exactly(arch, data, tmp_path):
    spec = str(model_dir(tmp_path, arch, data["vocab"]))
    full = tmp_path / "full"
    train(data["data"], full, spec, "train.max_steps=4", "checkpoint.every=2")
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_00000004")
    (part / "checkpoints" / "LATEST").write_text("step_00000002\n")
    resumed = train(data["data"], part, spec, "train.max_steps=4", "checkpoint.every=2", resume=True)
    ref = build_model(str(full / "checkpoints" / "step_00000004" / "model"), data["vocab"])
    for (k, p), q in zip(ref.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), k


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_dwm_weighting_fd_trains(arch, data, tmp_path):
    run = tmp_path / "run"
    train(data["data"], run, str(model_dir(tmp_path, arch, data["vocab"])), "weighting.mode=dwm",
          "weighting.backend=fd", f"weighting.reference={data['ref']}", "train.max_steps=5",
          "weighting.stages=5", "weighting.advanced.updates_per_stage=1", "weighting.net.width=32", "weighting.net.heads=2",
          "weighting.probe_size=16", "weighting.advanced.ref_batch_size=4", "weighting.advanced.lr=0.01")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    bilevel = [r for r in recs if r.get("event") == "bilevel"]
    assert len(bilevel) == 5 and all(r["ok"] for r in bilevel)


# -------------------------------------------------------------------------------------------- bad input
BAD_CASES = {
    "bert": ({"model_type": "bert"}, "model_type 'bert' is not supported"),
    "mamba": ({"model_type": "mamba"}, "model_type 'mamba' is not supported"),
    "typo": ({"model_type": "lama"}, "did you mean llama"),
    "no_type": ({"hidden_size": 32}, "names no \"model_type\""),
    "vocab": ({"vocab_size": 100}, "has vocab_size 100 but the data's tokenizer has"),
    "positions": ({"n_positions": 16}, "supports 16 positions (n_positions"),
}


@pytest.mark.parametrize("case", [*BAD_CASES, "missing", "malformed", "no_weights"])
def test_bad_model_dir_is_one_line_before_allocation(case, data, tmp_path, capsys, monkeypatch):
    import transformers

    def no_alloc(*a, **k):
        raise AssertionError("a model was allocated before the config was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_alloc)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_alloc)
    d = model_dir(tmp_path, "gpt2", data["vocab"])
    extra = []
    if case in BAD_CASES:
        over, expect = BAD_CASES[case]
        cfg = {**json.loads((d / "config.json").read_text()), **over}
        if case == "no_type":
            del cfg["model_type"]
        (d / "config.json").write_text(json.dumps(cfg))
    elif case == "missing":
        (d / "config.json").unlink()
        expect = "has no config.json"
    elif case == "malformed":
        (d / "config.json").write_text("{not json")
        expect = "cannot read"
    else:
        extra, expect = ["model.init=pretrained"], "has no weights"
    capsys.readouterr()
    assert main(["train", *overrides(data["data"], tmp_path / "run", str(d), *extra)]) == 2
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------------ BOS
def bos_tokenizer_dir(root: Path, add_bos: bool, texts: list[str]) -> Path:
    """An HF tokenizer dir: a byte-level BPE with <|endoftext|>, <pad> and <s>, and its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = root / f"tok-bos-{add_bos}"
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>", "<s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<pad>", "add_bos_token": add_bos}))
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    from eval_helpers import make_passages

    root = tmp_path_factory.mktemp("bos")
    texts = make_passages(40, seed=5)
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t, "domain": "ab"[i % 2]}) + "\n"
                           for i, t in enumerate(texts)))
    ref = root / "ref.jsonl"
    ref.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_passages(8, seed=9)))
    return {"root": root, "src": src, "texts": texts, "ref": ref}


def prep(corpus, name: str, tokenizer: Path | None) -> Path:
    from dwm.data.prepare import PrepareOptions, prepare

    out = corpus["root"] / name
    prepare([corpus["src"]], out, PrepareOptions(tokenizer=str(tokenizer) if tokenizer else None, vocab_size=300,
                                                 seq_len=SEQ, packing="doc", val_fraction=0.2, workers=1,
                                                 domain_field="domain", progress=False))
    return out


@pytest.mark.parametrize("policy", ["on", "off", "trained"])
def test_prepare_records_and_applies_bos_policy(policy, corpus):
    from tokenizers import Tokenizer

    tdir = None if policy == "trained" else bos_tokenizer_dir(corpus["root"], policy == "on", corpus["texts"])
    out = prep(corpus, f"prep-{policy}", tdir)
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    assert meta["add_bos"] is (policy == "on")
    assert meta["bos_id"] == (None if policy == "trained" else bos)
    data = PreparedData(out)
    assert data.add_bos is (policy == "on") and data.bos_id == meta["bos_id"]
    # packing "doc": row 0 of each document is [BOS] + its tokens + EOS (cut at seq_len)
    doc_ids = data.doc_ids
    firsts = [i for i in range(len(data)) if i == 0 or doc_ids[i] != doc_ids[i - 1]]
    text_of = {f"d{i}": t for i, t in enumerate(corpus["texts"])}
    for i in firsts:
        plain = tok.encode(text_of[doc_ids[i]], add_special_tokens=False).ids
        expect = ([bos] if policy == "on" else []) + plain + [data.eos_id]
        assert data.tokens[i, : data.n_tokens[i]].tolist() == expect[:SEQ]
    # the saved tokenizer encodes text as the rows hold it
    assert tok.encode("the cat").ids[:1] == ([bos] if policy == "on" else tok.encode("the cat").ids[:1])
    if policy != "on":
        assert tok.encode("the cat").ids == tok.encode("the cat", add_special_tokens=False).ids
    if policy == "trained":  # the shipped BPE's tokenizer.json is not rewritten
        assert json.loads((out / "tokenizer.json").read_text())["post_processor"] is None


def test_directory_without_policy_reads_as_no_bos(corpus):
    from tokenizers import Tokenizer

    from dwm.data.tokenizer import load_prepared_tokenizer

    out = prep(corpus, "prep-on-old", bos_tokenizer_dir(corpus["root"], True, corpus["texts"]))
    meta = json.loads((out / "meta.json").read_text())
    del meta["bos_id"], meta["add_bos"]  # as written before the policy existed
    (out / "meta.json").write_text(json.dumps(meta))
    assert PreparedData(out).add_bos is False and PreparedData(out).bos_id is None
    tok, changed = load_prepared_tokenizer(out / "tokenizer.json", meta)
    assert changed
    assert tok.encode("the cat").ids == Tokenizer.from_file(str(out / "tokenizer.json")).encode(
        "the cat", add_special_tokens=False).ids


@pytest.mark.parametrize("policy", ["on", "off", "trained"])
def test_export_scores_passages_as_dwm_eval(policy, corpus, tmp_path):
    """An exported model + AutoTokenizer score passages exactly as `dwm eval`'s passage loss and the reference
    passages the weighting model uses: with a BOS first when the data's policy adds one, without otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dwm.data.passages import PassageSet, load_passages
    from dwm.eval.export import export_run, load_run_model, load_run_tokenizer, resolve_checkpoint
    from dwm.eval.lambada import passage_loss

    tdir = None if policy == "trained" else bos_tokenizer_dir(corpus["root"], policy == "on", corpus["texts"])
    data = corpus["root"] / f"prep-{policy}"
    if not (data / "meta.json").is_file():
        prep(corpus, f"prep-{policy}", tdir)
    run = tmp_path / "run"
    t = train(data, run, "tiny", "train.max_steps=2")
    out = tmp_path / "hf"
    export_run(run, out)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    bos = PreparedData(data).bos_id
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is (policy == "on")
    assert model.config.bos_token_id == (bos if policy == "on" else tok.bos_token_id)
    if policy == "trained":
        assert tok.bos_token_id is None and model.config.bos_token_id is None
    texts = load_passages(corpus["ref"])
    refset = PassageSet(corpus["ref"], t.tokenizer, max_len=512)  # what the weighting model optimises against
    nlls = []
    for text, ids_ref in zip(texts, refset.ids, strict=True):
        ids = tok(text)["input_ids"]
        assert (ids[0] == bos) is (policy == "on")
        assert ids == ids_ref
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
        nlls.append(-float(lp.gather(1, x[0, 1:, None]).mean()))
    ckpt, _ = resolve_checkpoint(run)
    ours = passage_loss(load_run_model(ckpt), load_run_tokenizer(run), corpus["ref"])
    assert abs(ours - sum(nlls) / len(nlls)) < 1e-5


def test_tokenizer_without_pad_pads_with_eos_and_missing_bos_is_an_error(corpus, capsys):
    from dwm.data.prepare import PrepareOptions, prepare

    d = bos_tokenizer_dir(corpus["root"] / "nopad", True, corpus["texts"])
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    del tcfg["pad_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    out = prep(corpus, "prep-nopad", d)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["pad_id"] == meta["eos_id"] and meta["add_bos"] is True
    (d / "tokenizer_config.json").write_text(json.dumps({**tcfg, "bos_token": "<bos>"}))  # not in the vocab
    with pytest.raises(UserError, match="'<bos>' is not in the vocabulary"):
        prepare([corpus["src"]], corpus["root"] / "prep-badbos", PrepareOptions(tokenizer=str(d), seq_len=SEQ))
    capsys.readouterr()
    assert main(["prepare", str(corpus["src"]), "--out", str(corpus["root"] / "prep-badbos"),
                 "--tokenizer", str(d)]) == 2
    err = capsys.readouterr().err
    assert "not in the vocabulary" in err and len(err.strip().splitlines()) == 1, err
