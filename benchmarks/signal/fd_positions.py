"""Can the fd hypergradient's two perturbed forwards score a subset of token positions? The LM head and its
log-softmax are about half of a cpu-small forward (8192-token vocabulary), so scoring every s-th position (a random
offset per sample, the same for the +/- pair: an unbiased estimate of the sample's mean NLL derivative) would cut
the forwards' cost by up to half. This measures what it does to the signal, against the reference-side noise:

    python benchmarks/signal/fd_positions.py CKPT_DIR REFERENCE.jsonl [--n 128] [--strides 2 4 8]

prints corr(full, full under another reference batch) and corr(full, stride-s subsampled) over the same samples,
sample level and over domain means. Answer at cpu-small's final checkpoint (5c3482d): no (docs/DECISIONS.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _checkpoint import load_checkpoint

from dwm.nn import bilevel


def strided_losses(stride: int, seed: int):
    """A stand-in for bilevel.Passes.sample_losses (the fd pair's forwards) that scores every `stride`-th
    position (HF logits_to_keep)."""
    gen = torch.Generator().manual_seed(seed)

    def losses(passes, input_ids, n_tokens):
        model, chunk = passes.model, passes.chunk
        B, T = input_ids.shape
        pos = torch.randint(0, stride, (B, 1), generator=gen) + stride * torch.arange((T - 1) // stride)[None]
        out = []
        for i in range(0, B, chunk):
            p = pos[i:i + chunk]
            z = model(input_ids=input_ids[i:i + chunk], logits_to_keep=p).logits
            nll = F.cross_entropy(z.reshape(-1, z.shape[-1]).float(),
                                  torch.take_along_dim(input_ids[i:i + chunk], p + 1, 1).reshape(-1),
                                  reduction="none").view(p.shape)
            m = (p + 1 < n_tokens[i:i + chunk, None]).float()
            out.append((nll * m).sum(1) / m.sum(1).clamp_min(1))
        return torch.cat(out)

    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("reference")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--strides", type=int, nargs="+", default=[2, 4, 8])
    a = ap.parse_args()
    ck = load_checkpoint(a.checkpoint)
    data, model, opt, lr = ck.data, ck.model, ck.optimizer, ck.lr
    ref = ck.reference(a.reference)
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice(len(data), a.n, replace=False))
    b, dom = data.batch(ids), data.domain_ids[ids]
    w = torch.cat([torch.ones(16), torch.zeros(a.n - 16)])
    full_losses = bilevel.Passes.sample_losses

    def signal(ref_idx, losses=full_losses):
        bilevel.Passes.sample_losses = losses
        try:
            r = bilevel.hypergradient(model, b.input_ids, b.n_tokens, w, *ref.batch(ref_idx), lr=lr,
                                      precond=bilevel.adam_lookahead(opt, model), measure_before=False,
                                      chunk_size=16)
        finally:
            bilevel.Passes.sample_losses = full_losses
        return -r.dL_dw.double().numpy()

    def by_domain(x):
        return np.array([x[dom == d].mean() for d in np.unique(dom)])

    ra, rb = (rng.choice(len(ref), 16, replace=False) for _ in range(2))
    A, B = signal(ra), signal(rb)
    print(f"reference noise: corr(full, full under another reference batch) {np.corrcoef(A, B)[0, 1]:.3f}, "
          f"domain means {np.corrcoef(by_domain(A), by_domain(B))[0, 1]:.3f}")
    for s in a.strides:
        S1, S2 = signal(ra, strided_losses(s, 1)), signal(ra, strided_losses(s, 2))
        print(f"stride {s}: corr(full, subsampled) {np.corrcoef(A, S1)[0, 1]:.3f} / {np.corrcoef(A, S2)[0, 1]:.3f} "
              f"(two offset draws), domain means {np.corrcoef(by_domain(A), by_domain(S1))[0, 1]:.3f}")


if __name__ == "__main__":
    main()
