"""Where a stage's domain ranking noise comes from: the reference batch or the draw of probed training samples?
At one checkpoint, the target domain's margin (its mean signal minus the other domains' mean, domains with >= 5 of
the 128 samples) for the same 128 samples under 5 reference batches of 16, for 5 draws of 128 samples under one
reference batch, and for the first draw under one 64-passage reference batch.

    python benchmarks/signal/noise_sources.py books REFERENCE.jsonl CKPT_DIR

Answer at novels DWM seed 13's final checkpoint (5c3482d): s.d. 0.06 across reference batches, 0.20 across draws.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _checkpoint import load_checkpoint

from dwm.weighting.bilevel import adam_lookahead, hypergradient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("reference")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    ck = load_checkpoint(a.checkpoint)
    data, model, opt, lr = ck.data, ck.model, ck.optimizer, ck.lr
    ref = ck.reference(a.reference)
    names = np.array(data.domains)
    rng = np.random.default_rng(11)

    def margin(ids: np.ndarray, ref_idx: np.ndarray) -> tuple[float, np.ndarray]:
        b = data.batch(ids)
        w = torch.cat([torch.ones(16), torch.zeros(len(ids) - 16)])
        r = hypergradient(model, b.input_ids, b.n_tokens, w, *ref.batch(ref_idx), lr=lr,
                          precond=adam_lookahead(opt, model), measure_before=False, chunk_size=16)
        t = -r.dL_dw.double().numpy()
        t /= t.std(ddof=1)
        d = names[data.domain_ids[ids]]
        means = {g: t[d == g].mean() for g in np.unique(d) if (d == g).sum() >= 5}
        return means[a.target] - np.mean([v for g, v in means.items() if g != a.target]), t

    def draw() -> np.ndarray:
        return np.sort(rng.choice(len(data), 128, replace=False))

    def ref_batch(n: int = 16) -> np.ndarray:
        return rng.choice(len(ref), n, replace=False)

    ids0, r0 = draw(), ref_batch()
    by_ref = [margin(ids0, ref_batch()) for _ in range(a.repeats)]
    corr = np.mean([np.corrcoef(by_ref[i][1], by_ref[j][1])[0, 1]
                    for i in range(a.repeats) for j in range(i + 1, a.repeats)])
    m = [x[0] for x in by_ref]
    print(f"same samples, {a.repeats} reference batches: margins {np.round(m, 2)}, s.d. {np.std(m, ddof=1):.3f} "
          f"(sample-level correlation {corr:.3f})")
    m = [margin(draw(), r0)[0] for _ in range(a.repeats)]
    print(f"same reference batch, {a.repeats} draws of 128 samples: margins {np.round(m, 2)}, "
          f"s.d. {np.std(m, ddof=1):.3f}")
    print(f"same samples, one 64-passage reference batch: margin {margin(ids0, ref_batch(64))[0]:.2f}")


if __name__ == "__main__":
    main()
