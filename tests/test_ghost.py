"""Ghost hypergradients: every sample's < M, grad l_i > read from the training backward, against brute force."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dwm.train.losses import per_sample_nll
from dwm.weighting.ghost import GhostScores, reference_direction
from test_bilevel import V, data, tiny_lm


def brute(model, ids, n, M):
    """< M, grad l_i > by one backward per sample, in the model's precision."""
    out = []
    names = [k for k, p in model.named_parameters()]
    params = [p for p in model.parameters()]
    for i in range(len(ids)):
        l = per_sample_nll(model(input_ids=ids[i:i + 1]).logits, ids[i:i + 1], n[i:i + 1]).sum()
        g = torch.autograd.grad(l, params, allow_unused=True)
        out.append(sum(float((gi * M[k]).sum()) for k, gi in zip(names, g) if gi is not None and k in M))
    return torch.tensor(out, dtype=torch.float64)


def random_direction(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}


def ghost_scores(model, ids, n, w, M, micro):
    """The training step's way: micro-batches of sum_i w_i l_i / B, one backward each, scores collected."""
    ghost = GhostScores(model)
    ghost.set_direction(M)
    B = len(ids)
    for a in range(0, B, micro):
        with ghost.capture():
            loss = (w[a:a + micro] * per_sample_nll(model(input_ids=ids[a:a + micro]).logits, ids[a:a + micro],
                                                    n[a:a + micro])).sum() / B
            loss.backward()
    out = ghost.collect(w / B)
    ghost.remove()
    return out


@pytest.mark.parametrize("micro", [6, 2])
def test_ghost_equals_brute_force_tied_llama(micro):
    """float64, tied embeddings (the embedding and the LM head read one matrix), weights != 1, accumulation over
    micro-batches: relative error <= 1e-6 against per-sample backward passes."""
    model = tiny_lm()
    ids, n, w, _, _ = data()
    M = random_direction(model)
    want = brute(model, ids, n, M)
    got = ghost_scores(model, ids, n, w, M, micro)
    assert float((got - want).norm() / want.norm()) <= 1e-6
    # the training gradient itself is untouched by the hooks
    ref = tiny_lm()
    (w * per_sample_nll(ref(input_ids=ids).logits, ids, n)).sum().div(len(ids)).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_ghost_equals_brute_force_gpt2_conv1d_layernorm_and_checkpointing():
    """GPT-2: Conv1D layers (W stored [in, out]), LayerNorm gains and biases, position embeddings, untied head is
    tied here too; also with activation checkpointing (the recomputed forwards must not count twice)."""
    from dwm.train.model import enable_activation_checkpointing

    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0,
                     attn_pdrop=0, use_cache=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).double()
    ids, n, w, _, _ = data()
    M = random_direction(model)
    want = brute(model, ids, n, M)
    assert float((ghost_scores(model, ids, n, w, M, 3) - want).norm() / want.norm()) <= 1e-6
    enable_activation_checkpointing(model)
    model.train()
    assert float((ghost_scores(model, ids, n, w, M, 3) - want).norm() / want.norm()) <= 1e-6


def test_reference_direction_is_preconditioned_reference_gradient():
    """M = P * grad L_ref(theta), chunked over passages, .grad left as found; with M the ghost score equals the
    plain directional derivative of each sample's loss (central difference in float64)."""
    from dwm.data.passages import passage_nll
    from dwm.weighting.bilevel import adam_preconditioner

    model = tiny_lm()
    ids, n, w, ref, mask = data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per_sample_nll(model(input_ids=ids).logits, ids, n).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    M, L = reference_direction(model, ref, mask, opt, chunk_size=3)
    assert all(p.grad is None for p in model.parameters())
    params = list(model.parameters())
    gref = torch.autograd.grad(passage_nll(model(input_ids=ref).logits, ref, mask), params)
    P = adam_preconditioner(opt, model)
    for (k, _), gr in zip(model.named_parameters(), gref):
        torch.testing.assert_close(M[k], gr * P[k], rtol=1e-10, atol=1e-14)
    assert L == pytest.approx(float(passage_nll(model(input_ids=ref).logits, ref, mask)), rel=1e-12)
    got = ghost_scores(model, ids, n, torch.ones(len(ids), dtype=torch.float64), M, 6)
    h = 1e-6 / float(torch.sqrt(sum((m * m).sum() for m in M.values())))  # a perturbation of norm 1e-6
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.add_(M[k], alpha=h)
        up = per_sample_nll(model(input_ids=ids).logits, ids, n)
        for k, p in model.named_parameters():
            p.add_(M[k], alpha=-2 * h)
        down = per_sample_nll(model(input_ids=ids).logits, ids, n)
        for k, p in model.named_parameters():
            p.add_(M[k], alpha=h)
    torch.testing.assert_close(got, (up - down) / (2 * h), rtol=1e-6, atol=1e-9)
