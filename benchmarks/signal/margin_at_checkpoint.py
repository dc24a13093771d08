"""The one-step signal at a checkpoint: per domain, the mean of -dL_ref(theta')/dw (fd, AdamW-step lookahead at
the checkpoint's lr, std-normalised per 128-sample draw) over the same seeded draws of training samples and
reference batches for every checkpoint given, and the target domain's margin over the other domains' mean.

    python benchmarks/signal/margin_at_checkpoint.py books REFERENCE.jsonl CKPT_DIR [CKPT_DIR ...] [--n 512]

Paired by construction: every checkpoint sees the same samples and reference passages, so a uniform run's and a
DWM run's final checkpoints of one seed compare what training on the weighted data did to the signal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from dwm.data.dataset import PreparedData
from dwm.data.passages import PassageSet
from dwm.run import load_config
from dwm.train.model import build_model
from dwm.train.trainer import make_optimizer
from dwm.weighting.bilevel import adam_lookahead, hypergradient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("reference")
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--min-n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    for ck in a.checkpoints:
        run = ck.parent.parent
        cfg = load_config(str(run / "config.toml"), [])
        data = PreparedData(cfg.data.dir, "train")
        model = build_model(str(ck / "model"), len(Tokenizer.from_file(str(run / "tokenizer.json")).get_vocab()))
        model.eval()
        opt = make_optimizer(model, cfg.optim)
        opt.load_state_dict(torch.load(ck / "trainer_state.pt", weights_only=False)["optimizer"])
        lr = max(opt.param_groups[0]["lr"], cfg.optim.lr * cfg.optim.min_lr_ratio)
        ref = PassageSet(a.reference, Tokenizer.from_file(str(run / "tokenizer.json")), max_len=256,
                         mode="passage", pad_id=data.pad_id)
        rng = np.random.default_rng(a.seed)
        sig, dom = [], []
        for _ in range(a.n // 128):
            ids = np.sort(rng.choice(len(data), 128, replace=False))
            b = data.batch(ids)
            ri, rm = ref.batch(rng.choice(len(ref), 16, replace=False))
            w = torch.cat([torch.ones(16), torch.zeros(112)])
            r = hypergradient(model, b.input_ids, b.n_tokens, w, ri, rm, lr=lr, precond=adam_lookahead(opt, model),
                              measure_before=False, chunk_size=16)
            t = -r.dL_dw.double().numpy()
            sig.append(t / t.std(ddof=1))
            dom.append(np.array(data.domains)[data.domain_ids[ids]])
        s, d = np.concatenate(sig), np.concatenate(dom)
        means = {g: s[d == g].mean() for g in np.unique(d) if (d == g).sum() >= a.min_n}
        order = sorted(means, key=lambda g: -means[g])
        margin = means[a.target] - np.mean([v for g, v in means.items() if g != a.target])
        print(f"{run.name}: {a.target} rank {order.index(a.target) + 1} of {len(order)}, margin {margin:+.3f}; "
              + " ".join(f"{g}:{means[g]:+.2f}" for g in order[:5]), flush=True)


if __name__ == "__main__":
    main()
