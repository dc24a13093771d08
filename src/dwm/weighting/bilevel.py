"""Hypergradients of the reference loss after one lookahead step with respect to the per-sample weights.

    theta'(w) = theta - lr * P * g(w),    g(w) = (1/B) sum_i w_i grad l_i(theta)
    dL_ref(theta')/dw_i = -(lr/B) * < grad L_ref(theta'), P grad l_i(theta) > = -(lr/B) * D_v l_i(theta),
    v = P grad L_ref(theta')

theta' is linear in w, so the chain rule above is exact (docs/METHOD.md). Two backends:
- "exact": double backward through torch.func.functional_call with w as a leaf (the reference; eager attention,
  single process only).
- "fd" (default): D_v l_i by central finite differences, (l_i(theta + eps v) - l_i(theta - eps v)) / (2 eps): one
  weighted backward, one reference backward, two no-grad forwards; works with SDPA/flash kernels and under DDP.

Both leave the model exactly as found: parameters bit-identical (a copy is kept and copied back, never
"add then subtract", which would not round-trip in float32), `.grad` untouched (torch.autograd.grad is used, never
.backward()), attention implementation restored; the optimizer is never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dwm.data.passages import passage_nll
from dwm.errors import UserError
from dwm.train.losses import per_sample_nll

BACKENDS = ("fd", "exact")


@dataclass
class HyperResult:
    """dL_dw: [B_local] dL_ref(theta')/dw_i for this rank's samples (zeros when ok is False).

    ref_loss_before / ref_loss_after: L_ref(theta) (nan unless measured) and L_ref(theta'), averaged over ranks.
    eps_used: the fd step (perturbation theta +/- eps*v, norm eps*v_norm); nan for "exact".
    v_norm: ||P grad L_ref(theta')||. ok: False when a loss, v or dL_dw was not finite (reason says which).
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


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(tensors: list[torch.Tensor], average: bool = False) -> None:
    """Sum (or average) a list of tensors across ranks in place, as one flat buffer per dtype."""
    world = _world()
    if world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat)
        if average:
            flat /= world
        off = 0
        for t in ts:
            t.copy_(flat[off: off + t.numel()].view_as(t))
            off += t.numel()


def _scalar_mean(x: float, device: torch.device) -> float:
    if _world() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / _world()


def _norm(tensors: list[torch.Tensor]) -> float:
    """Global 2-norm; per-tensor norms in the tensors' dtype (no float64 copies), combined in Python floats."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors))


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def adam_preconditioner(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """P = 1 / (sqrt(exp_avg_sq / (1 - beta2^t)) + eps) per trainable parameter, from a torch Adam/AdamW state: the
    optimizer's *current* diagonal, frozen (the design note's form). None before the first step. A parameter with
    no state while others have one gets P = 0. Prefer `adam_lookahead`, AdamW's real next step: this stale diagonal
    is ~1/eps for parameters that rarely get gradient (embedding rows of rare tokens), and a lookahead through it can
    jump orders of magnitude further than Adam ever moves.
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: dict[str, torch.Tensor] = {}
    seen = False
    for name, p in _trainable(model):
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state or id(p) not in group_of:
            out[name] = torch.zeros_like(p)
            continue
        seen = True
        group = group_of[id(p)]
        beta2, eps = group["betas"][1], group["eps"]
        step = float(state["step"])
        sq = state["max_exp_avg_sq"] if group.get("amsgrad") and "max_exp_avg_sq" in state else state["exp_avg_sq"]
        with torch.no_grad():
            out[name] = ((sq / (1.0 - beta2 ** step)).sqrt() + eps).reciprocal().to(p.dtype)
    return out if seen else None


@dataclass
class AdamLookahead:
    """The lookahead as AdamW's real next step, resolved inside `hypergradient` once its gradient g is known.

    AdamW would move theta by  lr * (m_hat / (sqrt(v_hat) + eps) + wd * theta),  m = beta1 m_t + (1 - beta1) g,
    v = beta2 v_t + (1 - beta2) g^2. Holding the denominator fixed (its value at this g), theta' is
        theta' = theta - offset - lr * P_eff g,   P_eff = c / (sqrt(v_hat) + eps),   c = (1 - beta1) / (1 - beta1^{t+1})
        offset = lr * (beta1 m_t / (1 - beta1^{t+1}) / (sqrt(v_hat) + eps) + wd * theta)
    which is linear in the weights through g alone, so dL_ref(theta')/dw_i = -(lr/B) <grad L_ref(theta'), P_eff
    grad l_i>: the same formula as the plain lookahead with P = P_eff, plus a w-independent offset. theta' is then
    exactly where optimizer.step() would put the LM (tests/test_bilevel.py checks this), so the hypergradient asks
    "how should this batch be weighted, given how the real optimizer will use it".
    """

    optimizer: torch.optim.Optimizer
    model: torch.nn.Module

    def resolve(self, grads: dict[str, torch.Tensor], lr: float
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(P_eff, offset) per trainable parameter name; see the class docstring."""
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        P_eff: dict[str, torch.Tensor] = {}
        offset: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in _trainable(self.model):
                if id(p) not in group_of:  # not optimised: does not move
                    P_eff[name] = torch.zeros_like(p)
                    offset[name] = torch.zeros_like(p)
                    continue
                group, state = group_of[id(p)], self.optimizer.state.get(p, {})
                beta1, beta2 = group["betas"]
                eps, wd = group["eps"], group.get("weight_decay", 0.0)
                t = float(state["step"]) + 1.0 if "step" in state else 1.0
                g = grads[name].detach()
                v = (beta2 * state["exp_avg_sq"] if "exp_avg_sq" in state else 0.0) + (1.0 - beta2) * g * g
                denom = (v / (1.0 - beta2 ** t)).sqrt() + eps
                bc1 = 1.0 - beta1 ** t
                P_eff[name] = ((1.0 - beta1) / bc1) / denom
                off = lr * wd * p.detach()
                if "exp_avg" in state:
                    off = off + lr * (beta1 / bc1) * state["exp_avg"] / denom
                offset[name] = off if torch.is_tensor(off) else torch.zeros_like(p)
        return P_eff, offset


def adam_lookahead(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> AdamLookahead:
    """The `precond` for hypergradient that makes the lookahead AdamW's real next step (AdamLookahead)."""
    return AdamLookahead(optimizer, model)


def _ok_everywhere(ok: bool, device: torch.device) -> bool:
    """Every rank takes the same decision (one rank's non-finite dL/dw skips the update on all)."""
    if _world() == 1:
        return ok
    t = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def _global_batch(n_local: int, device: torch.device) -> int:
    if _world() == 1:
        return n_local
    t = torch.tensor([n_local], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


def hypergradient(model: torch.nn.Module, input_ids: torch.Tensor, n_tokens: torch.Tensor, weights: torch.Tensor,
                  ref_input_ids: torch.Tensor, ref_mask: torch.Tensor, *, lr: float,
                  precond: dict[str, torch.Tensor] | AdamLookahead | None = None, backend: str = "fd", fd_eps: float = 1e-2,
                  global_batch_size: int | None = None, measure_before: bool = True,
                  chunk_size: int | None = None) -> HyperResult:
    """dL_ref(theta')/dw for this rank's samples; see the module docstring for the maths and guarantees.

    input_ids [B_local, T], n_tokens [B_local], weights [B_local] (normalised over the global batch: their sum over
    ranks is the global B; detached here, the weighting net's graph is the caller's); ref_input_ids / ref_mask: this
    rank's reference batch (PassageSet.batch). Under torch.distributed the weighted gradient is summed and the
    reference gradient averaged over ranks, so theta' and v are the same everywhere. `global_batch_size` defaults
    to the sum of the local sizes. `measure_before` costs one no-grad reference forward (for logging L_ref(theta)).

    A sample with weight 0 does not move theta' (the fd backend skips its gradient), but still gets its
    dL_ref(theta')/dw_i: the influence of giving it weight in this step. So one lookahead on a training batch
    yields hypergradients for any number of further samples at two no-grad forwards each. `chunk_size` bounds the
    samples per forward of the fd backend (default: all at once).
    """
    if backend not in BACKENDS:
        raise UserError(f"hypergradient backend must be one of {BACKENDS}, got {backend!r}")
    if not lr > 0:
        raise UserError(f"lookahead learning rate must be > 0, got {lr}")
    if weights.shape != (input_ids.shape[0],) or n_tokens.shape != (input_ids.shape[0],):
        raise UserError(f"weights {tuple(weights.shape)} and n_tokens {tuple(n_tokens.shape)} must be "
                        f"[{input_ids.shape[0]}] like the batch")
    device = input_ids.device
    B = global_batch_size or _global_batch(input_ids.shape[0], device)
    named = _trainable(model)
    before = math.nan
    if measure_before:
        with torch.no_grad():
            before = _scalar_mean(float(passage_nll(model(input_ids=ref_input_ids).logits, ref_input_ids,
                                                       ref_mask)), device)
    if backend == "exact":
        return _exact(model, named, input_ids, n_tokens, weights, ref_input_ids, ref_mask, lr, precond, B, before)
    return _fd(model, named, input_ids, n_tokens, weights, ref_input_ids, ref_mask, lr, precond, B, before, fd_eps,
               chunk_size or input_ids.shape[0])


def _failed(n: int, device: torch.device, before: float, after: float, reason: str, backend: str,
            **kw) -> HyperResult:
    return HyperResult(torch.zeros(n, device=device), before, after, ok=False, reason=reason, backend=backend, **kw)


def _per_sample_losses(model, input_ids, n_tokens, chunk: int) -> torch.Tensor:
    return torch.cat([per_sample_nll(model(input_ids=input_ids[i:i + chunk]).logits, input_ids[i:i + chunk],
                                      n_tokens[i:i + chunk]) for i in range(0, input_ids.shape[0], chunk)])


def _fd(model, named, input_ids, n_tokens, weights, ref_ids, ref_mask, lr, precond, B, before, fd_eps, chunk):
    params = [p for _, p in named]
    P = [precond.get(n) if isinstance(precond, dict) else None for n, _ in named]
    if any(p.dtype not in (torch.float32, torch.float64) for p in params):
        raise UserError("the 'fd' hypergradient needs float32/float64 parameters (a perturbation of norm 0.01 is "
                        "below bf16/fp16 resolution); keep fp32 master weights or use backend 'exact'")
    n_local, device = input_ids.shape[0], input_ids.device
    orig = [p.detach().clone() for p in params]  # exact restore: copy back, never add-then-subtract

    def restore() -> None:
        with torch.no_grad():
            for p, o in zip(params, orig):
                p.copy_(o)

    try:
        # g = (1/B) sum_i w_i grad l_i(theta), summed over ranks; weight-0 samples contribute nothing
        active = weights.detach() != 0
        g: list[torch.Tensor | None] = [None] * len(params)
        if bool(active.any()):
            with torch.enable_grad():
                ids_a, n_a, w_a = input_ids[active], n_tokens[active], weights.detach()[active]
                l = per_sample_nll(model(input_ids=ids_a).logits, ids_a, n_a)
                loss = (w_a.to(l.dtype) * l).sum() / B
                g = list(torch.autograd.grad(loss, params, allow_unused=True))
            del l, loss
        g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]
        all_reduce_(g)
        offset = None
        if isinstance(precond, AdamLookahead):  # the same g on every rank -> the same P and offset
            Pd, od = precond.resolve({n: gi for (n, _), gi in zip(named, g)}, lr)
            P, offset = [Pd[n] for n, _ in named], [od[n] for n, _ in named]
        with torch.no_grad():  # theta' in place
            for i, (p, gi, Pi) in enumerate(zip(params, g, P)):
                if Pi is not None:
                    gi.mul_(Pi)
                p.sub_(gi, alpha=lr)
                if offset is not None:
                    p.sub_(offset[i])
        del g
        # L_ref(theta') and its gradient, averaged over ranks
        with torch.enable_grad():
            L = passage_nll(model(input_ids=ref_ids).logits, ref_ids, ref_mask)
            v = list(torch.autograd.grad(L, params, allow_unused=True))
        after = _scalar_mean(float(L.detach()), device)
        del L
        restore()
        if not math.isfinite(after):
            return _failed(n_local, device, before, after, "non-finite reference loss after the lookahead", "fd")
        v = [torch.zeros_like(p) if vi is None else vi for p, vi in zip(params, v)]
        all_reduce_(v, average=True)
        with torch.no_grad():
            for vi, Pi in zip(v, P):
                if Pi is not None:
                    vi.mul_(Pi)
            v_norm = _norm(v)
            theta_norm = _norm(orig)
        n_params = sum(o.numel() for o in orig)
        if not math.isfinite(v_norm) or v_norm == 0.0:
            return _failed(n_local, device, before, after, f"v = P grad L_ref(theta') has norm {v_norm}", "fd",
                           v_norm=v_norm)
        # perturbation norm eps*||v|| = fd_eps * max(1, rms(theta)) (docs/METHOD.md, float32 analysis)
        eps = fd_eps * max(1.0, theta_norm / math.sqrt(n_params)) / v_norm
        losses = []
        # full precision for the perturbed pair: bf16 autocast or TF32 matmuls (10-bit mantissa) would round the
        # ~1e-6-per-element perturbation away
        matmul_precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                for sign in (1.0, -1.0):
                    for p, vi in zip(params, v):
                        p.add_(vi, alpha=sign * eps)
                    losses.append(_per_sample_losses(model, input_ids, n_tokens, chunk))
                    restore()
        finally:
            torch.set_float32_matmul_precision(matmul_precision)
        dL_dw = -(lr / B) * (losses[0] - losses[1]) / (2.0 * eps)
        ok = _ok_everywhere(bool(torch.isfinite(dL_dw).all()), device)
        if not ok:
            return _failed(n_local, device, before, after, "non-finite dL/dw", "fd", eps_used=eps, v_norm=v_norm)
        return HyperResult(dL_dw.detach(), before, after, eps_used=eps, v_norm=v_norm, backend="fd",
                           extra={"perturbation_norm": eps * v_norm})
    finally:
        restore()


def _exact(model, named, input_ids, n_tokens, weights, ref_ids, ref_mask, lr, precond, B, before):
    if _world() > 1:
        raise UserError("the 'exact' hypergradient does not run under DDP (backward with create_graph); "
                        "use backend 'fd'")
    from torch.func import functional_call

    prev_attn = getattr(model.config, "_attn_implementation", None)
    switch = prev_attn not in (None, "eager")
    if switch:  # SDPA/flash kernels do not support double backward
        model.set_attn_implementation("eager")
    try:
        params = [p for _, p in named]
        w = weights.detach().to(params[0].dtype).clone().requires_grad_(True)
        with torch.enable_grad():
            l = per_sample_nll(model(input_ids=input_ids).logits, input_ids, n_tokens)
            loss = (w * l.to(w.dtype)).sum() / B
            g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            offset: dict[str, torch.Tensor] = {}
            if isinstance(precond, AdamLookahead):  # P is held fixed: resolved from g's value, not its graph
                precond, offset = precond.resolve({n: (gi.detach() if gi is not None else torch.zeros_like(p))
                                                   for (n, p), gi in zip(named, g)}, lr)
            new = {}
            for (name, p), gi in zip(named, g):
                if gi is None:
                    new[name] = p - offset[name] if name in offset else p
                    continue
                Pi = precond.get(name) if precond is not None else None
                new[name] = p - lr * (gi * Pi if Pi is not None else gi)
                if name in offset:
                    new[name] = new[name] - offset[name]
            logits = functional_call(model, new, args=(), kwargs={"input_ids": ref_ids}).logits
            L = passage_nll(logits, ref_ids, ref_mask)
            grads = torch.autograd.grad(L, [w, *new.values()], allow_unused=True)
        after = float(L.detach())
        dL_dw = grads[0] if grads[0] is not None else torch.zeros_like(w)
        with torch.no_grad():
            v_norm = math.sqrt(sum(
                float(((gr * precond[n]) if precond is not None and n in precond else gr).double().pow(2).sum())
                for n, gr in zip(new, grads[1:]) if gr is not None))
        if not math.isfinite(after):
            return _failed(len(w), w.device, before, after, "non-finite reference loss after the lookahead",
                           "exact")
        if not bool(torch.isfinite(dL_dw).all()) or not math.isfinite(v_norm):
            return _failed(len(w), w.device, before, after, "non-finite dL/dw or v", "exact", v_norm=v_norm)
        return HyperResult(dL_dw.detach(), before, after, v_norm=v_norm, backend="exact")
    finally:
        if switch:
            model.set_attn_implementation(prev_attn)
