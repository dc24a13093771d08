"""What the one-step hypergradient says, domain by domain, at each saved checkpoint of a run (prints figures; not a
test). The question it answers: does the greedy signal phi learns from rank the target's domain first at every
point of training, or does the ranking move as the LM learns? (docs/DECISIONS.md, cause 2.)

    .venv/bin/python benchmarks/signal_by_checkpoint.py RUN_DIR REFERENCE.jsonl [--per-domain 8] [--repeats 2]

RUN_DIR needs several checkpoints (`checkpoint.every`) with their optimizer state. At each one, for `--repeats`
independent draws of `--per-domain` training samples per domain and 16 reference passages, it computes dL_ref/dw
with the lookahead the DWM uses by default (AdamW's real next step at the LM's scheduled learning rate, `fd`
backend, a 16-sample weighted batch as the lookahead's batch, first 128 tokens), standardises -dL/dw over the
probed samples (positive = up-weighting the sample lowers the reference loss) and prints its mean per domain
(averaged over the repeats), the top domains, and the correlation between the repeats' per-domain vectors
(how reproducible the ranking is).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from dwm.data.dataset import PreparedData
from dwm.data.passages import PassageSet
from dwm.eval.export import load_run_model
from dwm.train.config import OptimConfig
from dwm.train.trainer import make_optimizer
from dwm.weighting.bilevel import adam_lookahead, hypergradient

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def signal_at(ckpt: Path, data: PreparedData, ref: PassageSet, per_domain: int, repeats: int) -> dict:
    model = load_run_model(ckpt, device="cpu")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    opt = make_optimizer(model, OptimConfig(lr=1e-3))
    opt.load_state_dict(state["optimizer"])
    lr = float(state["scheduler"]["_last_lr"][0])
    doms = np.array(data.domains)[data.domain_ids]
    rows = []
    for rep in range(repeats):
        rng = np.random.default_rng(5 + rep)
        ids = np.concatenate([rng.choice(np.flatnonzero(doms == d), per_domain, replace=False) for d in data.domains])
        b = data.batch(ids)
        ri, rm = ref.batch(rng.choice(len(ref), min(16, len(ref)), replace=False))
        w = torch.zeros(len(ids))
        w[rng.choice(len(ids), 16, replace=False)] = 1.0
        res = hypergradient(model, b.input_ids[:, :128], b.n_tokens.clamp(max=128), w, ri, rm, lr=lr,
                            precond=adam_lookahead(opt, model), measure_before=False, global_batch_size=16,
                            chunk_size=32)
        g = -res.dL_dw.double().numpy()
        g /= g.std()
        rows.append([float(g[doms[ids] == d].mean()) for d in data.domains])
    mean = np.mean(rows, axis=0)
    by = {d: round(float(m), 2) for d, m in zip(data.domains, mean, strict=True)}
    agree = float(np.corrcoef(rows)[0, 1]) if repeats > 1 else float("nan")
    return {"step": int(state["step"]), "lr": lr, "top": sorted(by, key=lambda k: -by[k])[:3], "by_domain": by,
            "repeat_corr": round(agree, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("reference", help="LAMBADA-format JSONL the signal is measured against (the reference split)")
    p.add_argument("--per-domain", type=int, default=8, help="training samples per domain and repeat")
    p.add_argument("--repeats", type=int, default=2, help="independent draws of samples and reference passages")
    args = p.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run_dir)
    data_dir = Path(tomllib.loads((run / "config.toml").read_text())["data"]["dir"])
    data = PreparedData(data_dir, "train")
    ref = PassageSet(args.reference, Tokenizer.from_file(str(run / "tokenizer.json")), 256, "passage", data.pad_id)
    ckpts = sorted(p for p in (run / "checkpoints").glob("step_*") if p.is_dir())
    if not ckpts:
        raise SystemExit(f"{run}: no checkpoints")
    for ck in ckpts:
        print(json.dumps(signal_at(ck, data, ref, args.per_domain, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
