"""Hypergradients dL_ref(theta')/dw: fd vs exact vs brute force, preconditioning, restoration, guard, DDP, chain."""

from __future__ import annotations

import math
import os
import tempfile
import time
import types

import pytest
import torch
import torch.multiprocessing as mp
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from dwm.data.passages import passage_nll
from dwm.errors import UserError
from dwm.nn.bilevel import adam_preconditioner, hypergradient
from dwm.nn.losses import per_sample_nll
from dwm.weighting.config import WeightingNetConfig
from dwm.weighting.net import WeightingNet, weights_from_scores

V = 97


def _rmsnorm_full_precision(self, x):
    """LlamaRMSNorm without its float32 round trip, so a float64 model is float64 end to end."""
    dt = torch.promote_types(x.dtype, torch.float32)
    y = x.to(dt) * torch.rsqrt(x.to(dt).pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * y.to(x.dtype)


def tiny_lm(dtype=torch.float64, seed=0, attn="sdpa") -> LlamaForCausalLM:
    """2 layers, width 32, tied embeddings; float64 models get full-precision RMSNorm (HF's rounds to float32)."""
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, use_cache=False,
                      tie_word_embeddings=True)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    if dtype == torch.float64:
        for m in model.modules():
            if isinstance(m, LlamaRMSNorm):
                m.forward = types.MethodType(_rmsnorm_full_precision, m)
    return model


def data(seed=1, B=6, T=14, R=4, TR=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, T), generator=g)
    n = torch.randint(4, T + 1, (B,), generator=g)
    n[0] = T
    ids[torch.arange(T).unsqueeze(0) >= n.unsqueeze(1)] = 0  # padding
    w = 0.2 + 1.6 * torch.rand(B, generator=g, dtype=torch.float64)
    w = w * B / w.sum()
    ref = torch.randint(2, V, (R, TR), generator=g)
    mask = torch.ones(R, TR, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, 8:] = False  # a shorter passage
    return ids, n, w, ref, mask


def ref_after(model, ids, n, w, ref, mask, lr, precond):
    """Brute force L_ref(theta'(w)) with theta' built explicitly (no shortcut through the chain rule)."""
    named = [(k, p) for k, p in model.named_parameters()]
    l = per_sample_nll(model(input_ids=ids).logits, ids, n)
    g = torch.autograd.grad((w * l).sum() / len(w), [p for _, p in named])
    new = {k: (p - lr * (gi * precond[k] if precond else gi)).detach() for (k, p), gi in zip(named, g)}
    with torch.no_grad():
        return float(passage_nll(functional_call(model, new, args=(), kwargs={"input_ids": ref}).logits,
                                    ref, mask))


def brute_dw(model, ids, n, w, ref, mask, lr, precond=None, h=1e-3):
    out = torch.zeros_like(w)
    for i in range(len(w)):
        e = torch.zeros_like(w)
        e[i] = h
        out[i] = (ref_after(model, ids, n, w + e, ref, mask, lr, precond)
                  - ref_after(model, ids, n, w - e, ref, mask, lr, precond)) / (2 * h)
    return out


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def adam_state(model, ids, n, steps=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        per_sample_nll(model(input_ids=ids).logits, ids, n).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(-1).view(torch.uint8), snap[k].view(-1).view(torch.uint8)), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("use_adam", [False, True])
def test_fd_exact_and_brute_force_agree(use_adam):
    model = tiny_lm()
    ids, n, w, ref, mask = data()
    precond, lr = None, 0.5
    if use_adam:
        opt = adam_state(model, ids, n)
        precond, lr = adam_preconditioner(opt, model), 1e-3
        assert precond is not None and set(precond) == {k for k, _ in model.named_parameters()}
    snap = snapshot(model)
    fd = hypergradient(model, ids, n, w, ref, mask, lr=lr, precond=precond, backend="fd")
    assert_bit_identical(model, snap)
    assert model.config._attn_implementation == "sdpa"
    ex = hypergradient(model, ids, n, w, ref, mask, lr=lr, precond=precond, backend="exact")
    assert_bit_identical(model, snap)
    assert model.config._attn_implementation == "sdpa"  # eager only during the exact call
    bf = brute_dw(model, ids, n, w, ref, mask, lr, precond)
    assert fd.ok and ex.ok
    assert cos(fd.dL_dw, ex.dL_dw) >= 0.999 and rel(fd.dL_dw, ex.dL_dw) < 1e-3
    assert cos(ex.dL_dw, bf) >= 0.9999 and rel(ex.dL_dw, bf) < 1e-5
    assert cos(fd.dL_dw, bf) >= 0.999 and rel(fd.dL_dw, bf) < 1e-3
    assert math.isclose(fd.ref_loss_after, ex.ref_loss_after, rel_tol=1e-9)
    assert math.isclose(fd.ref_loss_before, ref_after(model, ids, n, w, ref, mask, 0.0, None), rel_tol=1e-12)
    assert math.isclose(fd.eps_used * fd.v_norm, 1e-2, rel_tol=1e-9)  # rms(theta) < 1 -> norm fd_eps
    assert abs(fd.v_norm - ex.v_norm) < 1e-6 * ex.v_norm


def test_float32_default_eps_matches_exact():
    model = tiny_lm(torch.float32)
    ids, n, w, ref, mask = data()
    w = w.float()
    fd = hypergradient(model, ids, n, w, ref, mask, lr=0.5, backend="fd")
    ex = hypergradient(model, ids, n, w, ref, mask, lr=0.5, backend="exact")
    assert cos(fd.dL_dw, ex.dL_dw) >= 0.999, (fd.dL_dw, ex.dL_dw)


def test_adam_preconditioner_none_before_first_step():
    model = tiny_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert adam_preconditioner(opt, model) is None
    ids, n, *_ = data()
    opt = adam_state(model, ids, n, steps=1)
    P = adam_preconditioner(opt, model)
    p0 = next(model.parameters())
    st = opt.state[p0]
    expect = 1.0 / ((st["exp_avg_sq"] / (1 - 0.999)).sqrt() + 1e-8)
    assert torch.allclose(P["model.embed_tokens.weight"], expect)


def test_guard_non_finite_returns_not_ok():
    model = tiny_lm()
    ids, n, w, ref, mask = data()
    snap = snapshot(model)
    for backend in ("fd", "exact"):
        r = hypergradient(model, ids, n, w, ref, mask, lr=1e300, backend=backend)
        assert not r.ok and r.reason and torch.equal(r.dL_dw, torch.zeros(len(w)))
        assert_bit_identical(model, snap)


def test_bad_input_is_user_error():
    model = tiny_lm()
    ids, n, w, ref, mask = data()
    with pytest.raises(UserError):
        hypergradient(model, ids, n, w, ref, mask, lr=0.1, backend="jvp")
    with pytest.raises(UserError):
        hypergradient(model, ids, n, w[:-1], ref, mask, lr=0.1)
    with pytest.raises(UserError):
        hypergradient(model.to(torch.bfloat16), ids, n, w, ref, mask, lr=0.1, backend="fd")


def bilevel_objective(net, model, ids, n, ref, mask, lr):
    """Full bi-level objective F(phi) = L_ref(theta'(w(phi))), explicitly."""
    with torch.no_grad():
        w = weights_from_scores(net(ids, n), temperature=1.0).double()
    return ref_after(model, ids, n, w, ref, mask, lr, None)


@pytest.mark.parametrize("backend", ["exact", "fd"])
def test_chain_to_phi_matches_finite_difference(backend):
    model = tiny_lm()
    ids, n, _, ref, mask = data()
    torch.manual_seed(3)
    net = WeightingNet(WeightingNetConfig(layers=1, width=16, heads=2, max_len=16, use_domain_feature=False), V).double()
    torch.nn.init.normal_(net.head[-1].weight, std=0.5)  # non-zero scores so every layer gets a gradient
    lr = 0.5
    scores = net(ids, n)
    w = weights_from_scores(scores, temperature=1.0)
    r = hypergradient(model, ids, n, w, ref, mask, lr=lr, backend=backend)
    w.backward(r.dL_dw)
    for param, idx in ((net.head[1].weight, (3, 5)), (net.embed.weight, (int(ids[0, 2]), 1))):
        h = 1e-4
        with torch.no_grad():
            param[idx] += h
        up = bilevel_objective(net, model, ids, n, ref, mask, lr)
        with torch.no_grad():
            param[idx] -= 2 * h
        down = bilevel_objective(net, model, ids, n, ref, mask, lr)
        with torch.no_grad():
            param[idx] += h
        num = (up - down) / (2 * h)
        assert abs(num) > 1e-9
        assert math.isclose(float(param.grad[idx]), num, rel_tol=1e-2 if backend == "fd" else 1e-5), (backend, num)


def _ddp_worker(rank, world, path, port):
    torch.set_num_threads(1)  # forked child: never enter the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_lm()
    ids, n, w, ref, mask = data(B=6, R=4)
    opt = adam_state(model, ids, n)
    P = adam_preconditioner(opt, model)
    sl, rs = slice(3 * rank, 3 * rank + 3), slice(2 * rank, 2 * rank + 2)
    r = hypergradient(model, ids[sl], n[sl], w[sl], ref[rs], mask[rs], lr=1e-3, precond=P)
    torch.save({"dw": r.dL_dw, "after": r.ref_loss_after, "ok": r.ok}, f"{path}/{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process(free_port):
    model = tiny_lm()
    ids, n, w, ref, mask = data(B=6, R=4)
    opt = adam_state(model, ids, n)
    one = hypergradient(model, ids, n, w, ref, mask, lr=1e-3, precond=adam_preconditioner(opt, model))
    with tempfile.TemporaryDirectory() as d:
        port = free_port()
        # fork, not spawn: spawn re-imports transformers in each child (~40 s on a loaded 2-core machine)
        ctx = mp.start_processes(_ddp_worker, args=(2, d, port), nprocs=2, join=False, start_method="fork")
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("DDP workers did not finish in 120 s")
        parts = [torch.load(f"{d}/{r}.pt") for r in range(2)]
    assert all(p["ok"] for p in parts)
    both = torch.cat([p["dw"] for p in parts])
    # each rank holds 3 of the 6 samples and 2 of the 4 reference passages
    assert torch.allclose(both, one.dL_dw, rtol=1e-6, atol=1e-12), (both, one.dL_dw)
    assert math.isclose(parts[0]["after"], one.ref_loss_after, rel_tol=1e-9)


def test_adam_lookahead_is_adamw_next_step():
    """theta' of the `adam_lookahead` preconditioner is exactly where AdamW's optimizer.step() puts the LM
    (momentum, bias corrections, decoupled weight decay included): L_ref(theta') reported by both backends equals
    L_ref after a real step on the weighted loss, and the two backends agree on dL/dw."""
    import copy

    from dwm.nn.bilevel import adam_lookahead

    model = tiny_lm()
    ids, n, w, ref, mask = data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(2):  # momentum and second-moment history
        opt.zero_grad()
        per_sample_nll(model(input_ids=ids).logits, ids, n).mean().backward()
        opt.step()
    results = {b: hypergradient(model, ids, n, w, ref, mask, lr=1e-2, precond=adam_lookahead(opt, model), backend=b)
               for b in ("fd", "exact")}
    real = copy.deepcopy(model)
    ropt = torch.optim.AdamW(real.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ropt.load_state_dict(opt.state_dict())
    ropt.zero_grad()
    ((w * per_sample_nll(real(input_ids=ids).logits, ids, n)).sum() / len(w)).backward()
    ropt.step()
    with torch.no_grad():
        after = float(passage_nll(real(input_ids=ref).logits, ref, mask))
        before = float(passage_nll(model(input_ids=ref).logits, ref, mask))
    assert after != pytest.approx(before, rel=1e-6)  # the step moved the reference loss
    for b, r in results.items():
        assert r.ok and r.ref_loss_after == pytest.approx(after, rel=1e-9, abs=1e-9), b
    assert cos(results["fd"].dL_dw, results["exact"].dL_dw) >= 0.999


def test_zero_weight_samples_get_their_influence_without_moving_the_lookahead():
    """Samples of weight 0 leave theta' where the weighted ones put it (fd skips their gradient) and get
    dL/dw_i all the same: equal to exact's (which keeps them in the graph) and to a brute-force derivative; the
    weighted samples' dL/dw is unchanged by their presence; chunked forwards change nothing."""
    model = tiny_lm()
    ids, n, w, ref, mask = data(B=6)
    extra_ids, extra_n, _, _, _ = data(seed=7, B=4)
    both_ids, both_n = torch.cat([ids, extra_ids]), torch.cat([n, extra_n])
    both_w = torch.cat([w, torch.zeros(4, dtype=w.dtype)])
    alone = hypergradient(model, ids, n, w, ref, mask, lr=1e-2, backend="fd", global_batch_size=6)
    fd = hypergradient(model, both_ids, both_n, both_w, ref, mask, lr=1e-2, backend="fd", global_batch_size=6,
                       chunk_size=3)
    ex = hypergradient(model, both_ids, both_n, both_w, ref, mask, lr=1e-2, backend="exact", global_batch_size=6)
    assert fd.ref_loss_after == pytest.approx(alone.ref_loss_after, rel=1e-12)  # the same theta'
    assert rel(fd.dL_dw[:6], alone.dL_dw) < 1e-9
    assert rel(fd.dL_dw, ex.dL_dw) < 1e-3 and cos(fd.dL_dw[6:], ex.dL_dw[6:]) > 0.999
    # brute force for an extra sample: L_ref(theta'(w)) with the batch scaled to the global size 6
    h, i = 1e-3, 7
    def after(wi):
        ww = both_w.clone()
        ww[i] = wi
        return ref_after(model, both_ids, both_n, ww * len(ww) / 6, ref, mask, 1e-2, None)
    brute = (after(h) - after(-h)) / (2 * h)
    assert float(fd.dL_dw[i]) == pytest.approx(brute, rel=1e-3)


@pytest.mark.parametrize("backend", ["fd", "exact"])
def test_chunked_passes_equal_one_pass(backend):
    """Every pass in chunks (the weighted gradient over 3 chunks of 2, the reference over chunks of 2 passages, the
    perturbed forwards or the double backward likewise) gives the hypergradient of one pass over everything, in
    float64 to rounding, with the AdamW lookahead; the model comes back bit-identical with its .grad untouched."""
    from dwm.nn.bilevel import adam_lookahead

    model = tiny_lm()
    ids, n, w, ref, mask = data()
    opt = adam_state(model, ids, n)
    for p in model.parameters():  # a stale gradient the update must leave as it found it
        p.grad = torch.full_like(p, 0.5)
    snap = snapshot(model)
    grads = [p.grad.clone() for p in model.parameters()]
    one = hypergradient(model, ids, n, w, ref, mask, lr=1e-2, precond=adam_lookahead(opt, model), backend=backend)
    chunked = hypergradient(model, ids, n, w, ref, mask, lr=1e-2, precond=adam_lookahead(opt, model),
                            backend=backend, chunk_size=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert one.ok and chunked.ok
    assert rel(chunked.dL_dw, one.dL_dw) < 1e-10
    assert chunked.ref_loss_after == pytest.approx(one.ref_loss_after, rel=1e-12)
    assert chunked.ref_loss_before == pytest.approx(one.ref_loss_before, rel=1e-12)
    assert chunked.v_norm == pytest.approx(one.v_norm, rel=1e-10)


@pytest.mark.parametrize("backend", ["fd", "exact"])
def test_activation_checkpointing_changes_nothing(backend):
    """The model's own activation checkpointing (non-reentrant, as train.activation_checkpointing sets it) gives
    the same hypergradient, in chunks, as without it."""
    from dwm.train.model import enable_activation_checkpointing

    ids, n, w, ref, mask = data()
    plain = tiny_lm()
    ckpt = tiny_lm()
    enable_activation_checkpointing(ckpt)
    plain.train()
    ckpt.train()
    a = hypergradient(plain, ids, n, w, ref, mask, lr=0.5, backend=backend, chunk_size=4)
    b = hypergradient(ckpt, ids, n, w, ref, mask, lr=0.5, backend=backend, chunk_size=4)
    assert a.ok and b.ok
    assert rel(b.dL_dw, a.dL_dw) < 1e-10


def test_autocast_passes_stay_close_and_perturbed_forwards_stay_float32():
    """Under the training step's bf16 autocast the weighted and reference passes run in bf16 and the fd
    hypergradient keeps the direction of the float32 one (the perturbed forwards run in float32: under bf16 the
    perturbation would round away and dL/dw would be noise)."""
    model = tiny_lm(dtype=torch.float32)
    ids, n, w, ref, mask = data()
    full = hypergradient(model, ids, n, w.float(), ref, mask, lr=0.5, backend="fd", chunk_size=3)
    bf16 = hypergradient(model, ids, n, w.float(), ref, mask, lr=0.5, backend="fd", chunk_size=3,
                         autocast_dtype=torch.bfloat16)
    assert full.ok and bf16.ok
    assert bf16.ref_loss_after != full.ref_loss_after  # the reference pass did run in bf16
    assert cos(bf16.dL_dw, full.dL_dw) > 0.98
