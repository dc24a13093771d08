"""The lookahead's preconditioner: AdamW's real next step (`adam_lookahead`, the default of the bi-level update)
or the optimizer's current Adam diagonal (`adam_preconditioner`). Used by dwm.nn.bilevel.hypergradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
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
    for name, p in trainable(model):
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
        for name, p in trainable(self.model):
            P_eff[name], off = self.terms(p, grads[name], lr)
            offset[name] = off if off is not None else torch.zeros_like(p)
        return P_eff, offset


def adam_lookahead(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> AdamLookahead:
    """The `precond` for hypergradient that makes the lookahead AdamW's real next step (AdamLookahead)."""
    return AdamLookahead(optimizer, model)
