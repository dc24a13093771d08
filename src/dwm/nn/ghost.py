"""Ghost hypergradients: < M, grad l_i(theta) > for every sample of a training step, inside that step's backward.

With M = P * grad L_ref(theta) (AdamW's diagonal P, a reference batch's gradient), the product is the first-order
hypergradient of every sample the LM trains on,

    dL_ref(theta')/dw_i ~ -(lr/B) < grad L_ref(theta), P grad l_i(theta) >,

the fd/exact lookahead's value with grad L_ref taken at theta instead of theta' (docs/METHOD.md section 12). It is
computed from what the backward already has, never materialising a per-sample gradient (GhostSuite / GREATS, Wang
et al. 2024-25): for a layer y = f(x; W) the sample's product is sum_t < delta_it, D_M y_it >, delta the gradient
of the loss at the layer's output, D_M y the derivative of the output along M:
- Linear (and GPT-2's Conv1D): D_M y = x M^T (+ M_b); the product is taken on the narrower side
  (sum_t < delta_t M, x_t > when the layer widens), so its extra memory is one activation of the narrower width;
- Embedding: D_M y = M[token ids] (a row gather);
- any other module that owns parameters (norm gains and biases): D_M y by forward-mode AD of the module at its
  input (torch.func.jvp), cheap for these small layers.
A parameter shared by two layers (tied embeddings) gets both layers' terms, as its gradient does.

The training loss of a micro-batch is sum_i w_i l_i / B, so the hooks see w_i / B times each sample's gradient;
`GhostScores.collect` divides that factor out (a sample of weight 0 has no gradient to read: its score is nan).
Under DDP or FSDP the hooks read this rank's activations and output gradients, before any gradient reduction, so
each rank scores its own samples; under gradient accumulation each micro-batch's backward scores its rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, jvp

from dwm.data.passages import passage_nll
from dwm.nn.lookahead import adam_preconditioner, trainable
from dwm.nn.passes import Passes, Sharded, all_reduce_, scalar_mean


def _is_conv1d(m: nn.Module) -> bool:  # transformers.pytorch_utils.Conv1D: y = x W + b, W [in, out]
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


class GhostScores:
    """Per-sample < M, grad l_i > from forward and tensor hooks on every module that owns trainable parameters.

    Usage: `ghost = GhostScores(model)`; `ghost.set_direction({name: M})` (M per trainable parameter name, e.g.
    P * grad L_ref); then for each micro-batch, `with ghost.capture(): loss.backward()` (the forward must run inside
    the same `capture`), or `start()` before a training step's forwards and `stop()` after its backward;
    `ghost.collect(scale)` returns the step's scores [n] in the order of the micro-batches' rows and clears them.
    Forwards without grad record nothing. `remove()` detaches the hooks.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._names = {id(p): n for n, p in model.named_parameters()}
        self.M: dict[str, torch.Tensor] = {}
        self._active = False
        self._forwards = 0  # forward calls of the root module while recording: the micro-batch index
        self._batch = 0  # rows of the current micro-batch
        self._parts: dict[int, torch.Tensor] = {}
        self._handles = []
        for mod in model.modules():
            own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if own:
                self._handles.append(mod.register_forward_hook(self._forward_hook(mod, own), with_kwargs=True))
        self._handles.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))

    # ------------------------------------------------------------ public

    def set_direction(self, M: dict[str, torch.Tensor]) -> None:
        """M per trainable parameter name (a name missing from M counts as 0)."""
        self.M = {k: v.detach() for k, v in M.items()}

    def start(self) -> None:
        """Record from now on: the next forwards' backward adds their rows' scores (until `stop`)."""
        self._active = True

    def stop(self) -> None:
        self._active = False

    @property
    def pending(self) -> bool:
        """Whether scores were recorded since the last collect."""
        return bool(self._parts)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Forwards inside register their layers' hooks; the backward of their loss then adds the scores."""
        prev, self._active = self._active, True
        try:
            yield
        finally:
            self._active = prev

    capture = recording

    def collect(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The scores of every row recorded since the last collect, micro-batch by micro-batch in forward order,
        divided by `scale` (per row: the factor the loss put on that row's gradient, w_i / B); float64."""
        parts = [self._parts[k] for k in sorted(self._parts)]
        self._parts.clear()
        self._forwards = 0
        out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        if scale is not None:
            s = scale.to(out)
            out = torch.where(s != 0, out / torch.where(s != 0, s, torch.ones_like(s)), torch.full_like(out, float("nan")))
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------ hooks

    def _root_pre_hook(self, module, args, kwargs):
        if self._active and torch.is_grad_enabled():
            self._forwards += 1
            first = args[0] if args else kwargs.get("input_ids")
            self._batch = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 0

    def _add(self, key: int, rows: torch.Tensor) -> None:
        rows = rows.detach().double()
        self._parts[key] = self._parts[key] + rows.to(self._parts[key].device) if key in self._parts else rows

    def _forward_hook(self, mod: nn.Module, own: list[tuple[str, nn.Parameter]]):
        names = [self._names[id(p)] for _, p in own]

        def hook(module, args, kwargs, output):
            if not (self._active and torch.is_grad_enabled()) or not isinstance(output, torch.Tensor) \
                    or not output.requires_grad:
                return
            Ms = [self.M.get(n) for n in names]
            if all(m is None for m in Ms):
                return
            key = self._forwards
            x = args[0] if args else next(iter(kwargs.values()))
            expanded = None
            if self._batch > 1 and output.dim() and output.shape[0] == 1:
                # an output shared by the whole batch (GPT-2's learned positions): hand the model an expanded
                # view, identical values, so each row's output gradient stays apart
                expanded = output.expand(self._batch, *output.shape[1:])

            def on_grad(delta: torch.Tensor) -> None:
                with torch.no_grad():
                    self._add(key, self._product(module, own, Ms, x, args, kwargs, delta))

            (expanded if expanded is not None else output).register_hook(on_grad)
            return expanded

        return hook

    @staticmethod
    def _product(mod, own, Ms, x, args, kwargs, delta) -> torch.Tensor:
        """sum over every non-batch dimension of < delta, D_M y > for this call's rows (float32 at least)."""
        ft = torch.promote_types(delta.dtype, torch.float32)
        d = delta.to(ft)
        B = d.shape[0]
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 and B > 1:  # a shared (broadcast) input
            x = x.expand(B, *x.shape[1:])
            args = (x, *args[1:]) if args else args
        Md = {n: (m.to(ft) if m is not None else None) for (n, _), m in zip(own, Ms)}
        if isinstance(mod, nn.Linear) or _is_conv1d(mod):
            W = Md.get("weight")
            out = torch.zeros(B, dtype=ft, device=d.device)
            if W is not None:
                if _is_conv1d(mod):
                    W = W.t()  # [out, in] like Linear's
                xf = x.to(ft)
                if W.shape[0] > W.shape[1]:  # widening (e.g. the LM head): delta M is the narrow side
                    out += (d @ W * xf).reshape(B, -1).sum(1)
                else:
                    out += (xf @ W.t() * d).reshape(B, -1).sum(1)
            if Md.get("bias") is not None:
                out += (d * Md["bias"]).reshape(B, -1).sum(1)
            return out
        if isinstance(mod, nn.Embedding) and set(Md) == {"weight"}:
            return (Md["weight"][x] * d).reshape(B, -1).sum(1)
        # any other module owning parameters (norms): the output's derivative along M by forward-mode AD
        pnames = [n for n, _ in own]
        primals = tuple(p.detach() for _, p in own)
        tangents = tuple(Md[n] if Md[n] is not None else torch.zeros_like(p) for n, p in zip(pnames, primals))
        tangents = tuple(t.to(p.dtype) for t, p in zip(tangents, primals))

        def f(*ps):
            return functional_call(mod, dict(zip(pnames, ps)), args, kwargs)

        _, dy = jvp(f, primals, tangents)
        return (dy.to(ft) * d).reshape(B, -1).sum(1)


def reference_direction(model: nn.Module, ref_input_ids: torch.Tensor, ref_mask: torch.Tensor,
                        optimizer: torch.optim.Optimizer | None, *, chunk_size: int | None = None,
                        autocast_dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """M = P * grad L_ref(theta) per trainable parameter (P = AdamW's current diagonal 1 / (sqrt(v_hat) + eps),
    1 before its first step) and L_ref(theta), over chunks of `chunk_size` passages; the parameters' .grad is left
    as it was. Averaged over ranks under torch.distributed, like the lookahead's reference gradient."""
    named = trainable(model)
    params = [p for _, p in named]
    passes = Passes(model, params, chunk_size or ref_input_ids.shape[0], autocast_dtype, Sharded(model))
    n = ref_input_ids.shape[0]

    def reference(a: int, b: int) -> torch.Tensor:
        per = passage_nll(model(input_ids=ref_input_ids[a:b]).logits, ref_input_ids[a:b], ref_mask[a:b],
                          reduce=False)
        return per.sum() / n

    v, loss = passes.grad(reference, n)
    all_reduce_(v, average=True)
    P = adam_preconditioner(optimizer, model) if optimizer is not None else None
    with torch.no_grad():
        if P is not None:
            for (name, _), vi in zip(named, v):
                vi.mul_(P[name])
    return {name: vi for (name, _), vi in zip(named, v)}, scalar_mean(loss, ref_input_ids.device)
