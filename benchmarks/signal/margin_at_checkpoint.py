"""The one-step signal at a checkpoint: per domain, the mean of -dL_ref(theta')/dw (fd, AdamW-step lookahead at
the checkpoint's lr, std-normalised per 128-sample draw) over the same seeded draws of training samples and
reference batches for every checkpoint given, and the target domain's margin over the other domains' mean.

    python benchmarks/signal/margin_at_checkpoint.py books REFERENCE.jsonl CKPT_DIR [CKPT_DIR ...] [--n 512]
        [--lr-mult 1 10 100] [--phi-lookahead]

Paired by construction: every checkpoint sees the same samples and reference passages, so a uniform run's and a
DWM run's final checkpoints of one seed compare what training on the weighted data did to the signal. --lr-mult
repeats the measurement with the lookahead's lr scaled (a longer step as a stand-in for a longer horizon), also on
the same draws, and prints the sample-level correlation with the first multiplier's signal. --phi-lookahead also
weights the lookahead step's 16 samples by the run's last weighting model (weighting/stage_K-1, its temperature),
as DWM's own updates do: the hypergradient is a derivative at the current weights, so a lookahead that already
leans on the target's domain leaves less to gain from more of it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _checkpoint import load_checkpoint

from dwm.nn.bilevel import adam_lookahead, hypergradient
from dwm.weighting.net import load_weighting_net, weights_from_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("reference")
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--min-n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--lr-mult", type=float, nargs="+", default=[1.0])
    ap.add_argument("--phi-lookahead", action="store_true")
    a = ap.parse_args()
    for path in a.checkpoints:
        run = path.parent.parent
        ck = load_checkpoint(path)
        cfg, data, model, opt, lr = ck.cfg, ck.data, ck.model, ck.optimizer, ck.lr
        ref = ck.reference(a.reference)
        first = None
        phi = None
        if a.phi_lookahead:
            stems = sorted((run / "weighting").glob("stage_*.json"), key=lambda q: int(q.stem.split("_")[1]))
            phi = load_weighting_net(stems[-1].with_suffix("")).eval()
            tau, floor = cfg.weighting.temperature, cfg.weighting.floor
        for mult in a.lr_mult:
            rng = np.random.default_rng(a.seed)
            sig, dom = [], []
            for _ in range(a.n // 128):
                ids = np.sort(rng.choice(len(data), 128, replace=False))
                b = data.batch(ids)
                ri, rm = ref.batch(rng.choice(len(ref), 16, replace=False))
                w = torch.cat([torch.ones(16), torch.zeros(112)])
                if phi is not None:
                    with torch.no_grad():
                        w[:16] = weights_from_scores(phi(b.input_ids[:16], b.n_tokens[:16], b.domain_ids[:16]),
                                                     tau, floor)
                r = hypergradient(model, b.input_ids, b.n_tokens, w, ri, rm, lr=lr * mult,
                                  precond=adam_lookahead(opt, model), measure_before=False, chunk_size=16)
                t = -r.dL_dw.double().numpy()
                sig.append(t / t.std(ddof=1))
                dom.append(np.array(data.domains)[data.domain_ids[ids]])
            s, d = np.concatenate(sig), np.concatenate(dom)
            first = s if first is None else first
            means = {g: s[d == g].mean() for g in np.unique(d) if (d == g).sum() >= a.min_n}
            order = sorted(means, key=lambda g: -means[g])
            margin = means[a.target] - np.mean([v for g, v in means.items() if g != a.target])
            how = f"lookahead lr x{mult:g}" + (", phi-weighted" if phi is not None else "")
            print(f"{run.name} ({how}): {a.target} rank {order.index(a.target) + 1} of {len(order)}, "
                  f"margin {margin:+.3f}, corr with x{a.lr_mult[0]:g} {np.corrcoef(first, s)[0, 1]:.3f}; "
                  + " ".join(f"{g}:{means[g]:+.2f}" for g in order[:5]), flush=True)


if __name__ == "__main__":
    main()
