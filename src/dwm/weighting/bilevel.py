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

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dwm.data.passages import passage_nll
from dwm.errors import UserError
from dwm.train import fsdp
from dwm.train.losses import per_sample_nll

BACKENDS = ("fd", "exact")
PARAM_COPIES = {"fd": 3, "exact": 3}  # saved theta, P, one gradient buffer (see the module docstring)
_BUCKET = 1 << 26  # elements per all-reduce buffer (256 MB in float32): bounds the flat copy all_reduce_ makes


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


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(tensors: list[torch.Tensor], average: bool = False) -> None:
    """Sum (or average) a list of tensors across ranks in place, in flat buffers of at most 2^26 elements per
    dtype (one collective per buffer, so the extra memory is bounded whatever the model's size)."""
    world = _world()
    if world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for t in ts:
            if buckets[-1] and size + t.numel() > _BUCKET:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += t.numel()
        for bucket in buckets:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            if average:
                flat /= world
            off = 0
            for b in bucket:
                b.copy_(flat[off: off + b.numel()].view_as(b))
                off += b.numel()


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
    optimizer's *current* diagonal, frozen. None before the first step. A parameter with
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

    def __post_init__(self) -> None:
        self._group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}

    def terms(self, p: torch.nn.Parameter, g: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(P_eff, offset) of one parameter given its lookahead gradient g; offset None when it is zero."""
        group = self._group_of.get(id(p))
        if group is None:  # not optimised: does not move
            return torch.zeros_like(p), None
        state = self.optimizer.state.get(p, {})
        beta1, beta2 = group["betas"]
        eps, wd = group["eps"], group.get("weight_decay", 0.0)
        with torch.no_grad():
            t = float(state["step"]) + 1.0 if "step" in state else 1.0
            g = g.detach()
            v = (beta2 * state["exp_avg_sq"] if "exp_avg_sq" in state else 0.0) + (1.0 - beta2) * g * g
            denom = (v / (1.0 - beta2 ** t)).sqrt_().add_(eps)
            del v
            bc1 = 1.0 - beta1 ** t
            offset = p.detach() * (lr * wd) if wd else None
            if "exp_avg" in state:
                mom = state["exp_avg"] * (lr * beta1 / bc1) / denom
                offset = mom if offset is None else offset.add_(mom)
            return denom.reciprocal_().mul_((1.0 - beta1) / bc1), offset

    def resolve(self, grads: dict[str, torch.Tensor], lr: float
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(P_eff, offset) of every trainable parameter at once (two parameter-sized copies; `hypergradient` uses
        `terms` one parameter at a time instead)."""
        P_eff, offset = {}, {}
        for name, p in _trainable(self.model):
            P_eff[name], off = self.terms(p, grads[name], lr)
            offset[name] = off if off is not None else torch.zeros_like(p)
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


class _Sharded:
    """What an update does differently when the LM is sharded (train.parallel=fsdp, dwm/train/fsdp.py): its
    parameters are DTensor shards, edited in place shard by shard; a forward computes with gathered copies, so the
    gradients come from a plain backward into .grad, which FSDP reduce-scatters as the *mean* over ranks; every rank
    runs the same passes (each forward and backward is a collective); the units are resharded before the shards are
    edited (a forward without backward leaves the root unit gathered, and the next one would not re-gather).
    Unsharded (one process or DDP) it is autograd on the parameters plus all_reduce_'s sums and averages."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.on = model, fsdp.is_sharded(model)
        self.low_precision = self.on and fsdp.compute_dtype(model) in fsdp.LOW_PRECISION
        self.settle()

    def settle(self) -> None:
        if self.on:
            fsdp.reshard(self.model)

    def backward(self, loss: torch.Tensor, params: list[torch.Tensor]) -> None:
        if self.on:
            loss.backward()
        else:
            torch.autograd.backward(loss, inputs=params)

    def sum_over_ranks(self, ts: list[torch.Tensor]) -> None:
        if not self.on:
            all_reduce_(ts)
            return
        for t in ts:  # FSDP's reduce-scatter averaged: the sum is world x the mean
            t.mul_(_world())

    def mean_over_ranks(self, ts: list[torch.Tensor]) -> None:
        if not self.on:
            all_reduce_(ts, average=True)

    def norm(self, ts: list[torch.Tensor]) -> float:
        return fsdp.global_norm(ts) if self.on else _norm(ts)

    def extra_chunks(self, n_chunks: int, device: torch.device) -> int:
        """Sharded: how many more chunks the busiest rank runs than this one (0 unsharded)."""
        if not self.on:
            return 0
        t = torch.tensor([n_chunks], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) - n_chunks


class _Passes:
    """The chunked passes of one hypergradient: model, chunk size and the training step's autocast. Sharded, a rank
    with fewer chunks than another runs the difference on its first sample, discarded (at weight 0 in a gradient)."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], chunk: int,
                 autocast_dtype: torch.dtype | None, sharded: _Sharded):
        self.model, self.params, self.chunk, self.autocast_dtype = model, params, max(1, chunk), autocast_dtype
        self.sharded = sharded

    def padded(self, n: int, device: torch.device):
        """spans(n), then (0, 1) as often as other ranks have more chunks (the caller discards those)."""
        spans = list(self.spans(n))
        return spans + [(0, 1)] * self.sharded.extra_chunks(len(spans), device)

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def spans(self, n: int):
        return ((i, min(n, i + self.chunk)) for i in range(0, n, self.chunk))

    def sample_losses(self, ids: torch.Tensor, n_tok: torch.Tensor) -> torch.Tensor:
        """Per-sample NLL [n] without a graph, in the current precision settings (chunked)."""
        out = []
        with torch.no_grad():
            for a, b in self.padded(ids.shape[0], ids.device):
                out.append(per_sample_nll(self.model(input_ids=ids[a:b]).logits, ids[a:b], n_tok[a:b]))
        out = out[:len(list(self.spans(ids.shape[0])))]  # sharded: the padding chunks' losses dropped
        return torch.cat(out) if out else torch.zeros(0, device=ids.device)

    def ref_loss(self, ref_ids: torch.Tensor, ref_mask: torch.Tensor) -> float:
        """L_ref(theta) without a graph (chunked; the mean over passages)."""
        total = 0.0
        n = ref_ids.shape[0]
        with torch.no_grad(), self.autocast(ref_ids.device):
            for k, (a, b) in enumerate(self.padded(n, ref_ids.device)):
                per = passage_nll(self.model(input_ids=ref_ids[a:b]).logits, ref_ids[a:b], ref_mask[a:b],
                                  reduce=False)
                total += float(per.sum()) if k * self.chunk < n else 0.0  # sharded padding: dropped
        return total / n

    def grad(self, loss_of_chunk, n: int) -> tuple[list[torch.Tensor], float]:
        """sum over chunks of grad_theta loss_of_chunk(a, b), accumulated into fresh buffers (the parameters'
        `.grad` is set aside meanwhile and put back), and the summed loss value."""
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        total = 0.0
        try:
            with torch.enable_grad():
                for k, (a, b) in enumerate(self.padded(n, self.params[0].device)):
                    pad = k * self.chunk >= n  # sharded: a chunk other ranks run, at weight 0 here
                    with self.autocast(self.params[0].device):
                        loss = loss_of_chunk(a, b) * (0.0 if pad else 1.0)
                    self.sharded.backward(loss, self.params)
                    total += float(loss.detach())
                    del loss
            out = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        finally:
            for p, s in zip(self.params, saved):
                p.grad = s
        return out, total


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
    sharded = _Sharded(model)  # (resharded first: _trainable then lists the shards, not gathered copies)
    named = _trainable(model)
    params = [p for _, p in named]
    if backend == "fd" and sharded.low_precision:
        raise UserError("the 'fd' hypergradient under fsdp needs float32 compute, but fsdp gathers the parameters in "
                        "bf16 (below the perturbation's resolution): set train.precision=fp32")
    if backend == "fd" and any(p.dtype not in (torch.float32, torch.float64) for p in params):
        raise UserError("the 'fd' hypergradient needs float32/float64 parameters (a perturbation of norm 0.01 is "
                        "below bf16/fp16 resolution); keep fp32 master weights or use backend 'exact'")
    if backend == "exact" and _world() > 1:
        raise UserError("the 'exact' hypergradient does not run under DDP or FSDP (backward with create_graph); "
                        "use backend 'fd'")
    device = input_ids.device
    B = global_batch_size or _global_batch(input_ids.shape[0], device)
    passes = _Passes(model, params, chunk_size or max(input_ids.shape[0], ref_input_ids.shape[0]), autocast_dtype,
                     sharded)
    before = _scalar_mean(passes.ref_loss(ref_input_ids, ref_mask), device) if measure_before else math.nan
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


def _lookahead(passes: _Passes, named, input_ids, n_tokens, weights, ref_ids, ref_mask, lr, precond, B, restore
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
    after = _scalar_mean(after, ref_ids.device)
    passes.sharded.mean_over_ranks(v)
    with torch.no_grad():
        for vi, Pi in zip(v, P):
            if Pi is not None:
                vi.mul_(Pi)
    return v, after


def _fd(passes: _Passes, u, u_norm, orig, restore, input_ids, n_tokens, lr, B, before, after, fd_eps
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
    if not _ok_everywhere(bool(torch.isfinite(dL_dw).all()), device):
        return _failed(len(dL_dw), device, before, after, "non-finite dL/dw", "fd", eps_used=eps, v_norm=u_norm)
    return HyperResult(dL_dw.detach(), before, after, eps_used=eps, v_norm=u_norm, backend="fd",
                       extra={"perturbation_norm": eps * u_norm})


def _exact(passes: _Passes, model, u, u_norm, input_ids, n_tokens, weights, lr, B, before, after) -> HyperResult:
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
