"""Does the lookahead's second-order term matter? Ghost scores (grad L_ref at theta) against the lookahead
hypergradient (grad L_ref at theta') on the same samples, at the learning rates a run uses.

    .venv/bin/python benchmarks/signal/ghost_vs_lookahead.py --data DIR --reference data/target/reference.jsonl

Trains cpu-small uniformly for --steps steps on the prepared DIR (so the AdamW state is a real one), then, for 128
training samples and one reference batch, compares
- ghost: -(lr/B) < P grad L_ref(theta), grad l_i(theta) >, P = AdamW's current diagonal (dwm.weighting.ghost);
- exact lookahead, same P: dL_ref(theta')/dw_i with theta' = theta - lr P g (the difference is theta vs theta' alone);
- fd lookahead with AdamW's real next step (adam_lookahead: what the DWM weighter uses),
at lr = the run's lr x {1, 10, 100}. Prints Pearson / Spearman correlations and the relative difference.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from dwm.data.passages import PassageSet
from dwm.run import build_trainer, load_config, recipe_path
from dwm.train.losses import per_sample_nll
from dwm.weighting.bilevel import adam_lookahead, adam_preconditioner, hypergradient
from dwm.weighting.ghost import GhostScores, reference_direction


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--reference", default="data/target/reference.jsonl")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--samples", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(recipe_path("cpu-small-uniform"), [f"data.dir={args.data}", f"out={tmp}/r",
                                                             f"train.max_steps={args.steps}", "log.progress=false",
                                                             f"checkpoint.every={args.steps}"])
        tr = build_trainer(cfg)
        tr.train()
        model, opt = tr.model, tr.optimizer
        rng = np.random.default_rng(0)
        ids = np.sort(rng.choice(len(tr.train_data), args.samples, replace=False))
        b = tr.train_data.batch(ids)
        ref = PassageSet(args.reference, tr.tokenizer, max_len=256, mode="passage", pad_id=tr.train_data.pad_id)
        ri, rm = ref.batch(rng.choice(len(ref), 16, replace=False))
        lr0 = float(cfg.optim.lr * cfg.optim.min_lr_ratio)  # the run's final (smallest) learning rate
        B = args.samples
        w = torch.ones(B)
        M, _ = reference_direction(model, ri, rm, opt, chunk_size=16)
        ghost = GhostScores(model)
        ghost.set_direction(M)
        for a in range(0, B, 16):
            with ghost.capture():
                (per_sample_nll(model(input_ids=b.input_ids[a:a + 16]).logits, b.input_ids[a:a + 16],
                                b.n_tokens[a:a + 16]).sum() / B).backward()
        score = ghost.collect(torch.full((B,), 1.0 / B)).numpy()
        model.zero_grad(set_to_none=True)
        P = adam_preconditioner(opt, model)
        print(f"cpu-small after {args.steps} uniform steps; {B} samples, 16 reference passages; lr0 = {lr0:g}")
        print("| lr | vs | Pearson | Spearman | rel. diff |")
        print("|---|---|---|---|---|")
        for mult in (1, 10, 100):
            lr = lr0 * mult
            g = -(lr / B) * score
            same_p = hypergradient(model, b.input_ids, b.n_tokens, w, ri, rm, lr=lr, precond=P, backend="exact",
                                   chunk_size=16, measure_before=False).dL_dw.double().numpy()
            real = hypergradient(model, b.input_ids, b.n_tokens, w, ri, rm, lr=lr, precond=adam_lookahead(opt, model),
                                 chunk_size=16, measure_before=False).dL_dw.double().numpy()
            for name, x in (("exact lookahead, same P", same_p), ("fd lookahead, AdamW next step", real)):
                rel = float(np.linalg.norm(g - x) / np.linalg.norm(x))
                print(f"| {lr:g} | {name} | {np.corrcoef(g, x)[0, 1]:.4f} | {spearman(g, x):.4f} | {rel:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
