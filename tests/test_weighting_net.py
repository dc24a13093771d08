"""WeightingNet (masking, options, init, save/load), weights_from_scores, and PassageSet / passage_nll."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dwm.data.passages import PassageSet, passage_nll
from dwm.errors import UserError
from dwm.testing import train_tiny_tokenizer
from dwm.weighting.config import WeightingNetConfig
from dwm.weighting.net import WeightingNet, load_weighting_net, save_weighting_net, weights_from_scores

V = 50


def net_with(seed=0, **kw) -> WeightingNet:
    torch.manual_seed(seed)
    cfg = WeightingNetConfig(**{"layers": 1, "width": 16, "heads": 2, "max_len": 12, "use_domain_feature": False, **kw})
    net = WeightingNet(cfg, V, n_domains=kw.pop("n_domains", 3)).eval()
    torch.nn.init.normal_(net.head[-1].weight, std=1.0)  # non-zero scores (the init is exactly 0)
    return net


def batch(B=4, T=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.tensor([10, 3, 7, 1][:B])


def test_weights_from_scores():
    s = torch.randn(7, dtype=torch.float64)
    w = weights_from_scores(s, temperature=0.5)
    assert math.isclose(float(w.sum()), 7.0, rel_tol=1e-12)
    assert torch.allclose(w, 7 * torch.softmax(s / 0.5, 0))
    assert torch.equal(weights_from_scores(torch.zeros(5)), torch.ones(5))
    wf = weights_from_scores(s, floor=0.3)
    assert math.isclose(float(wf.sum()), 7.0, rel_tol=1e-12) and float(wf.min()) >= 0.3
    assert torch.allclose(wf, 0.7 * 7 * torch.softmax(s, 0) + 0.3)
    # scores of a gathered global batch normalised to a different B keep the sum at B
    assert math.isclose(float(weights_from_scores(s, floor=0.2, batch_size=14).sum()), 14.0, rel_tol=1e-12)
    with pytest.raises(UserError):
        weights_from_scores(s, temperature=0.0)
    with pytest.raises(UserError):
        weights_from_scores(s, floor=1.5)


def test_initial_scores_are_zero():
    net = WeightingNet(WeightingNetConfig(layers=1, width=16, heads=2, max_len=12, use_domain_feature=False), V)
    ids, n = batch()
    s = net(ids, n)
    assert s.shape == (4,) and torch.equal(s, torch.zeros(4))
    assert torch.equal(weights_from_scores(s), torch.ones(4))


def test_padding_and_truncation_do_not_change_scores():
    net = net_with()
    ids, n = batch()
    s = net(ids, n)
    noisy = ids.clone()
    pad = torch.arange(ids.shape[1]).unsqueeze(0) >= n.unsqueeze(1)
    noisy[pad] = (noisy[pad] + 17) % V
    assert torch.allclose(net(noisy, n), s, atol=1e-6)
    # a real token does change the score (the test can fail)
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 1) % V
    assert not torch.allclose(net(changed, n)[0], s[0])
    # beyond max_len (12) nothing is read
    longer = torch.cat([ids, torch.randint(0, V, (4, 2))], 1)
    long_ids = torch.cat([longer, torch.randint(0, V, (4, 6))], 1)
    assert torch.allclose(net(long_ids, torch.full((4,), 18)), net(longer, torch.full((4,), 12)), atol=1e-6)
    # the other samples of the batch do not matter without batch_context
    assert torch.allclose(net(ids[:2], n[:2]), s[:2], atol=1e-6)


def test_batch_context_makes_scores_depend_on_the_batch():
    net = net_with(batch_context=True)
    ids, n = batch()
    s = net(ids, n)
    assert not torch.allclose(net(ids[:2], n[:2]), s[:2], atol=1e-4)


def test_domain_and_loss_features():
    net = net_with(use_domain_feature=True, use_loss_feature=True)
    ids, n = batch()
    d, loss = torch.tensor([0, 1, 2, 0]), torch.tensor([3.0, 4.0, 5.0, 6.0])
    s = net(ids, n, domain_ids=d, lm_loss=loss)
    assert not torch.allclose(net(ids, n, domain_ids=torch.tensor([1, 1, 2, 0]), lm_loss=loss)[0], s[0])
    assert not torch.allclose(net(ids, n, domain_ids=d, lm_loss=loss + 1)[0], s[0])
    with pytest.raises(UserError):
        net(ids, n, lm_loss=loss)
    with pytest.raises(UserError):
        WeightingNet(WeightingNetConfig(use_domain_feature=True), V, n_domains=0)


@pytest.mark.parametrize("lm_width", [16, 24])
def test_init_from_lm_embedding(lm_width):
    emb = torch.randn(V, lm_width)
    net = WeightingNet(WeightingNetConfig(layers=1, width=16, heads=2, max_len=12, init_from_lm_embedding=True,
                                          use_domain_feature=False),
                       V, lm_embedding=emb)
    assert torch.equal(net.embed.weight, emb)
    ids, n = batch()
    assert net(ids, n).shape == (4,)
    with pytest.raises(UserError):
        WeightingNet(WeightingNetConfig(init_from_lm_embedding=True, use_domain_feature=False), V + 1, lm_embedding=emb)


def test_save_load_round_trip(tmp_path):
    net = net_with(use_domain_feature=True)
    st, js = save_weighting_net(net, tmp_path / "weighting" / "stage_0")
    assert st.is_file() and json.loads(js.read_text())["net"]["width"] == 16
    back = load_weighting_net(js).eval()
    ids, n = batch()
    d = torch.tensor([0, 1, 2, 0])
    assert torch.equal(back(ids, n, domain_ids=d), net(ids, n, domain_ids=d))
    with pytest.raises(UserError):
        load_weighting_net(tmp_path / "missing")


# ---------------------------------------------------------------- reference set

@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(["the cat sat on the mat", "a dog ran to the old barn door quickly"], 300)


def write_ref(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_reference_passage_and_target_masks(tmp_path, tok):
    p = write_ref(tmp_path / "ref.jsonl", ["the cat sat on the mat", "a dog ran to the barn", "a zqxjkvwzqxjkvw"])
    ps = PassageSet(p, tok, max_len=64, mode="passage", pad_id=1)
    assert len(ps) == 3 and ps.n_skipped == 0
    short = PassageSet(p, tok, max_len=6, mode="target")
    assert len(short) == 2 and short.n_skipped == 1  # a target longer than max_len cannot be scored
    ids, mask = ps.batch([0, 2])
    n0 = len(tok.encode("the cat sat on the mat").ids)
    assert ids[0, :n0].tolist() == tok.encode("the cat sat on the mat").ids
    assert mask[0].tolist() == [False] + [True] * (n0 - 1) + [False] * (ids.shape[1] - n0)
    assert (ids[0, n0:] == 1).all()
    ts = PassageSet(p, tok, max_len=64, mode="target")
    ids, mask = ts.batch([0])
    tgt = tok.encode(" mat").ids
    assert ids[0, mask[0]].tolist() == tgt
    assert ids[0, : int((~mask[0]).sum())].tolist() == tok.encode("the cat sat on the").ids
    # rng draws distinct passages
    ids, _ = ps.batch(np.random.default_rng(0), 3)
    assert sorted(r.tolist() for r in ids) == sorted(r.tolist() for r in ps.batch([0, 1, 2])[0])


def test_passage_nll_matches_manual(tmp_path):
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    lp = torch.log_softmax(logits, -1)
    nll0 = -sum(lp[0, j - 1, ids[0, j]] for j in range(1, 5)) / 4
    nll1 = -lp[1, 1, ids[1, 2]]
    assert math.isclose(float(passage_nll(logits, ids, mask)), float((nll0 + nll1) / 2), rel_tol=1e-12)
    per = passage_nll(logits, ids, mask, reduce=False)
    assert per.shape == (2,) and math.isclose(float(per[0]), float(nll0), rel_tol=1e-12)
    assert math.isclose(float(per[1]), float(nll1), rel_tol=1e-12)


def test_reference_errors(tmp_path, tok):
    with pytest.raises(UserError):
        PassageSet(tmp_path / "nope.jsonl", tok, 16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b c"}\nnot json\n')
    with pytest.raises(UserError, match=":2:"):
        PassageSet(bad, tok, 16)
    with pytest.raises(UserError, match="no usable passages"):
        PassageSet(write_ref(tmp_path / "r.jsonl", ["a b"]), tok, 1 + 1, mode="target")
