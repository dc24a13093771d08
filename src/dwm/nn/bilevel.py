"""Hypergradients of the reference loss after one lookahead step with respect to the per-sample weights.

    theta'(w) = theta - lr * P * g(w),    g(w) = (1/B) sum_i w_i grad l_i(theta)
    dL_ref(theta')/dw_i = -(lr/B) * < grad L_ref(theta'), P grad l_i(theta) > = -(lr/B) * D_u l_i(theta),
    u = P grad L_ref(theta')

theta' is linear in w, so the chain rule above is exact (docs/METHOD.md). Two backends:
- "fd" (default): D_u l_i by central finite differences, (l_i(theta + eps u) - l_i(theta - eps u)) / (2 eps): one
  weighted backward, one reference backward, two no-grad forwards; works with SDPA/flash kernels and under DDP.
- "exact": D_u l_i by autograd, d/dw_i of < u, grad_theta sum_j w_j l_j / B > (a double backward, so eager
  attention and a single process); the reference the fd backend is tested against.

Memory is set by the micro-batch, not by the number of probed samples: every pass (the weighted gradient, the
reference loss and its gradient, the perturbed forwards, the exact backend's double backward) runs over chunks of
`chunk_size` samples or passages and accumulates. The weighted and reference passes run under the training step's
autocast (`autocast_dtype`) and use the model's own activation checkpointing; the fd backend's perturbed forwards
always run in full float32 precision (a perturbation of relative size ~1e-4 is below bf16's resolution). Beyond the
model, its gradients' usual room and the optimizer, an update holds three parameter-sized tensors: the saved
parameters, the preconditioner P (AdamW's next-step diagonal, resolved one parameter at a time) and one gradient
buffer (g, then grad L_ref(theta')). With `precond=None` it holds two; with a dict `precond` the caller holds P.

Both backends leave the model exactly as found: parameters bit-identical (a copy is kept and copied back, never
"add then subtract", which would not round-trip in float32), `.grad` as it was (set aside and put back; the passes
accumulate into fresh buffers), attention implementation restored; the optimizer is never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dwm.data.passages import passage_nll
from dwm.errors import UserError
from dwm.nn.lookahead import AdamLookahead, adam_lookahead, adam_preconditioner, trainable  # noqa: F401 (re-exported)
from dwm.nn.losses import per_sample_nll
from dwm.nn.passes import (  # noqa: F401 (all_reduce_ re-exported: this module offered it)
    Passes,
    Sharded,
    all_reduce_,
    global_batch,
    ok_everywhere,
    scalar_mean,
    world_size,
)

BACKENDS = ("fd", "exact")
PARAM_COPIES = {"fd": 3, "exact": 3}  # saved theta, P, one gradient buffer (see the module docstring)


@dataclass
class HyperResult:
    """dL_dw: [B_local] dL_ref(theta')/dw_i for this rank's samples (zeros when ok is False).

    ref_loss_before / ref_loss_after: L_ref(theta) (nan unless measured) and L_ref(theta'), averaged over ranks.
    eps_used: the fd step (perturbation theta +/- eps*u, norm eps*u_norm); nan for "exact".
    v_norm: ||P grad L_ref(theta')||. ok: False when a loss, u or dL_dw was not finite (reason says which).
    """

    dL_dw: torch.Tensor
    ref_loss_before: float
    ref_loss_after: float
    eps_used: float = math.nan
    v_norm: float = math.nan
    ok: bool = True
    reason: str = ""
    backend: str = "fd"
    extra: dict = field(default_factory=dict)


def hypergradient(model: torch.nn.Module, input_ids: torch.Tensor, n_tokens: torch.Tensor, weights: torch.Tensor,
                  ref_input_ids: torch.Tensor, ref_mask: torch.Tensor, *, lr: float,
                  precond: dict[str, torch.Tensor] | AdamLookahead | None = None, backend: str = "fd",
                  fd_eps: float = 1e-2, global_batch_size: int | None = None, measure_before: bool = True,
                  chunk_size: int | None = None, autocast_dtype: torch.dtype | None = None) -> HyperResult:
    """dL_ref(theta')/dw for this rank's samples; see the module docstring for the maths and guarantees.

    input_ids [B_local, T], n_tokens [B_local], weights [B_local] (normalised over the global batch: their sum over
    ranks is the global B; detached here, the weighting net's graph is the caller's); ref_input_ids / ref_mask: this
    rank's reference batch (PassageSet.batch). Under torch.distributed the weighted gradient is summed and the
    reference gradient averaged over ranks, so theta' and u are the same everywhere. `global_batch_size` defaults
    to the sum of the local sizes. `measure_before` costs one no-grad reference pass (for logging L_ref(theta)).

    `chunk_size`: samples (and reference passages) per forward in every pass; the training micro-batch keeps the
    update's memory at a training step's, whatever the number of samples (default: all at once).
    `autocast_dtype`: the training step's autocast (None = full precision) for the weighted and reference passes.

    A sample with weight 0 does not move theta' (its gradient is skipped), but still gets its dL_ref(theta')/dw_i:
    the influence of giving it weight in this step. So one lookahead on a training batch yields hypergradients for
    any number of further samples at two no-grad forwards each (fd).
    """
    if backend not in BACKENDS:
        raise UserError(f"hypergradient backend must be one of {BACKENDS}, got {backend!r}")
    if not lr > 0:
        raise UserError(f"lookahead learning rate must be > 0, got {lr}")
    if weights.shape != (input_ids.shape[0],) or n_tokens.shape != (input_ids.shape[0],):
        raise UserError(f"weights {tuple(weights.shape)} and n_tokens {tuple(n_tokens.shape)} must be "
                        f"[{input_ids.shape[0]}] like the batch")
    sharded = Sharded(model)  # (resharded first: trainable() then lists the shards, not gathered copies)
    named = trainable(model)
    params = [p for _, p in named]
    if backend == "fd" and sharded.low_precision:
        raise UserError("the 'fd' hypergradient under fsdp needs float32 compute, but fsdp gathers the parameters in "
                        "bf16 (below the perturbation's resolution): set train.precision=fp32")
    if backend == "fd" and any(p.dtype not in (torch.float32, torch.float64) for p in params):
        raise UserError("the 'fd' hypergradient needs float32/float64 parameters (a perturbation of norm 0.01 is "
                        "below bf16/fp16 resolution); keep fp32 master weights or use backend 'exact'")
    if backend == "exact" and world_size() > 1:
        raise UserError("the 'exact' hypergradient does not run under DDP or FSDP (backward with create_graph); "
                        "use backend 'fd'")
    device = input_ids.device
    B = global_batch_size or global_batch(input_ids.shape[0], device)
    passes = Passes(model, params, chunk_size or max(input_ids.shape[0], ref_input_ids.shape[0]), autocast_dtype,
                     sharded)
    before = scalar_mean(passes.ref_loss(ref_input_ids, ref_mask), device) if measure_before else math.nan
    orig = [p.detach().clone() for p in params]  # exact restore: copy back, never add-then-subtract

    def restore() -> None:
        sharded.settle()
        with torch.no_grad():
            for p, o in zip(params, orig):
                p.copy_(o)

    try:
        u, after = _lookahead(passes, named, input_ids, n_tokens, weights, ref_input_ids, ref_mask, lr, precond, B,
                              restore)
        if not math.isfinite(after):
            return _failed(input_ids.shape[0], device, before, after, "non-finite reference loss after the "
                           "lookahead", backend)
        u_norm = sharded.norm(u)
        if not math.isfinite(u_norm) or u_norm == 0.0:
            return _failed(input_ids.shape[0], device, before, after,
                           f"u = P grad L_ref(theta') has norm {u_norm}", backend, v_norm=u_norm)
        if backend == "exact":
            return _exact(passes, model, u, u_norm, input_ids, n_tokens, weights, lr, B, before, after)
        return _fd(passes, u, u_norm, orig, restore, input_ids, n_tokens, lr, B, before, after, fd_eps)
    finally:
        restore()


def _failed(n: int, device: torch.device, before: float, after: float, reason: str, backend: str,
            **kw) -> HyperResult:
    return HyperResult(torch.zeros(n, device=device), before, after, ok=False, reason=reason, backend=backend, **kw)


def _lookahead(passes: Passes, named, input_ids, n_tokens, weights, ref_ids, ref_mask, lr, precond, B, restore
               ) -> tuple[list[torch.Tensor], float]:
    """u = P grad L_ref(theta') (averaged over ranks) and L_ref(theta'); theta is restored on return.

    g = (1/B) sum_i w_i grad l_i(theta) over the weighted samples (summed over ranks; weight-0 samples skipped),
    theta' = theta - lr P g - offset in place, one parameter at a time, keeping only P."""
    params = passes.params
    w = weights.detach()
    active = torch.nonzero(w != 0).flatten()
    if passes.sharded.on and not active.numel():  # other ranks' weighted passes need this rank's: one sample at 0
        active = torch.zeros(1, dtype=torch.long, device=w.device)
    if active.numel():
        ids_a, n_a, w_a = input_ids[active], n_tokens[active], w[active]

        def weighted(a: int, b: int) -> torch.Tensor:
            l = per_sample_nll(passes.model(input_ids=ids_a[a:b]).logits, ids_a[a:b], n_a[a:b])
            return (w_a[a:b].to(l.dtype) * l).sum() / B

        g, _ = passes.grad(weighted, len(active))
    else:
        g = [torch.zeros_like(p) for p in params]
    passes.sharded.sum_over_ranks(g)
    P: list[torch.Tensor | None] = []
    passes.sharded.settle()
    with torch.no_grad():  # theta' in place, one parameter at a time; each gradient is freed once applied
        for i, (name, p) in enumerate(named):
            gi, g[i] = g[i], None  # type: ignore[call-overload]
            offset = None
            if isinstance(precond, AdamLookahead):  # the same g on every rank -> the same P and offset
                Pi, offset = precond.terms(p, gi, lr)
            else:
                Pi = precond.get(name) if isinstance(precond, dict) else None
            if Pi is not None:
                gi.mul_(Pi)
            p.sub_(gi, alpha=lr)
            if offset is not None:
                p.sub_(offset)
            P.append(Pi)
            del gi, offset
    n_ref = ref_ids.shape[0]

    def reference(a: int, b: int) -> torch.Tensor:
        per = passage_nll(passes.model(input_ids=ref_ids[a:b]).logits, ref_ids[a:b], ref_mask[a:b], reduce=False)
        return per.sum() / n_ref

    v, after = passes.grad(reference, n_ref)
    restore()
    after = scalar_mean(after, ref_ids.device)
    passes.sharded.mean_over_ranks(v)
    with torch.no_grad():
        for vi, Pi in zip(v, P):
            if Pi is not None:
                vi.mul_(Pi)
    return v, after


def _fd(passes: Passes, u, u_norm, orig, restore, input_ids, n_tokens, lr, B, before, after, fd_eps
        ) -> HyperResult:
    device = input_ids.device
    theta_norm = passes.sharded.norm(orig)
    n_params = sum(o.numel() for o in orig)
    # perturbation norm eps*||u|| = fd_eps * max(1, rms(theta)) (docs/METHOD.md, float32 analysis)
    eps = fd_eps * max(1.0, theta_norm / math.sqrt(n_params)) / u_norm
    losses = []
    # full precision for the perturbed pair: bf16 autocast or TF32 matmuls (10-bit mantissa) would round the
    # ~1e-6-per-element perturbation away
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for sign in (1.0, -1.0):
                passes.sharded.settle()
                for p, ui in zip(passes.params, u):
                    p.add_(ui, alpha=sign * eps)
                losses.append(passes.sample_losses(input_ids, n_tokens))
                restore()
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    dL_dw = -(lr / B) * (losses[0] - losses[1]) / (2.0 * eps)
    if not ok_everywhere(bool(torch.isfinite(dL_dw).all()), device):
        return _failed(len(dL_dw), device, before, after, "non-finite dL/dw", "fd", eps_used=eps, v_norm=u_norm)
    return HyperResult(dL_dw.detach(), before, after, eps_used=eps, v_norm=u_norm, backend="fd",
                       extra={"perturbation_norm": eps * u_norm})


def _exact(passes: Passes, model, u, u_norm, input_ids, n_tokens, weights, lr, B, before, after) -> HyperResult:
    """dL/dw_c = -lr * d/dw_c < u, grad_theta (sum_{i in c} w_i l_i / B) > for each chunk c: a double backward
    whose graph spans one chunk (eager attention: SDPA kernels have no double backward)."""
    prev_attn = getattr(model.config, "_attn_implementation", None)
    switch = prev_attn not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")
    params = passes.params
    out = []
    try:
        with torch.enable_grad():
            for a, b in passes.spans(input_ids.shape[0]):
                w = weights.detach()[a:b].to(params[0].dtype).clone().requires_grad_(True)
                with passes.autocast(input_ids.device):
                    l = per_sample_nll(model(input_ids=input_ids[a:b]).logits, input_ids[a:b], n_tokens[a:b])
                g = torch.autograd.grad((w * l.to(w.dtype)).sum() / B, params, create_graph=True,
                                        allow_unused=True)
                s = sum((gi * ui).sum() for gi, ui in zip(g, u) if gi is not None)
                dw = torch.autograd.grad(s, w, allow_unused=True)[0] if torch.is_tensor(s) else None
                out.append(-lr * dw.detach() if dw is not None else torch.zeros_like(w.detach()))
                del g, s, l, w
    finally:
        if switch:
            model.set_attn_implementation(prev_attn)
    dL_dw = torch.cat(out)
    if not bool(torch.isfinite(dL_dw).all()):
        return _failed(len(dL_dw), input_ids.device, before, after, "non-finite dL/dw", "exact", v_norm=u_norm)
    return HyperResult(dL_dw, before, after, v_norm=u_norm, backend="exact")
