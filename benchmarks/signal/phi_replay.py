"""Replay a finished DWM run's whole phi fit offline, from the same initial phi and the same evidence (every stage's
probed samples and their signal, from the last checkpoint's buffer), in the run's own order of groups, and print the
probe set's mean weight per domain after the last stage; then the same with a change to how phi fits.

    python benchmarks/signal/phi_replay.py books RUN_DIR [RUN_DIR ...] [--variants run shrink:16 domain-lr:0.1]

The probed samples are uniform draws from the pool and their signal is what the run measured, so the replay asks:
given the same evidence, what would phi rank? `run` must reproduce the run's saved last-stage ranking (the check
that the replay is faithful); the others change one thing:
- `shrink:K`: phi fits each sample's target with its domain's mean part shrunk toward the buffer's mean by
  n_d / (n_d + K) (n_d: the domain's samples in the buffer): a domain seen in a handful of samples cannot outrank one
  seen in a hundred on a noisy mean (empirical-Bayes shrinkage of the per-domain means).
- `domain-lr:X`: the domain embedding at X times phi's learning rate (Adam gives a row with sporadic gradients,
  a rare domain's, steps as large as a frequent one's).
- `lr:X`: all of phi at X times its learning rate.
- `ema:D`: rank with an exponential moving average of phi's parameters over its steps (decay D per step; Polyak
  averaging: the last few groups drawn weigh less in the model that scores).
Needs `weighting.buffer_stages >= stages` (the default: every stage's evidence is still in the last buffer).

Answer (95d9bd4; novels, cpu-small seeds 6-9 and 13-17 at 150 steps and 3-7 at 300): `run` reproduces all 14 saved
rankings; books first as run 10 of 14, shrink:16 9 of 14, shrink:64 7 of 14, domain-lr:0.1 8 of 14
(docs/DECISIONS.md): each fixes one miss and breaks others. Speech (the same seeds): as run 13 of 14 (seed 6 at
300 steps: speech eighth); ema:0.9 14 of 14 and books 11 of 14, ema:0.75 13 and 10 of 14: one run either way, with flatter weights.
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
from dwm.weighting.dwm_weighter import phi_objective, probe_ids, probed_records
from dwm.weighting.net import WeightingNet, load_weighting_net, weights_from_scores


def shrunk(t: np.ndarray, dom: np.ndarray, K: float) -> np.ndarray:
    """t with each domain's mean offset from the overall mean scaled by n_d / (n_d + K)."""
    out, m = t.copy(), t.mean()
    for d in np.unique(dom):
        sel = dom == d
        md = t[sel].mean()
        out[sel] -= (1.0 - sel.sum() / (sel.sum() + K)) * (md - m)
    return out


def replay(run: Path, variant: str) -> tuple[dict[str, float], dict[str, float]]:
    cfg = load_config(str(run / "config.toml"), [])
    wc = cfg.weighting
    data = PreparedData(cfg.data.dir, "train")
    names = np.array(data.domains)
    latest = (run / "checkpoints" / "LATEST").read_text().strip()
    recs = probed_records(torch.load(run / "checkpoints" / latest / "trainer_state.pt",
                                     weights_only=False)["weighter"])
    if sorted({r.stage for r in recs}) != list(range(wc.stages)):
        raise SystemExit(f"{run}: the last buffer does not hold every stage (buffer_stages < stages?)")
    rng = np.random.default_rng([cfg.train.seed, 0xD3])  # the weighter's generator: ids, reference batch, groups
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    n_ref = len(PassageSet(wc.reference, tok, max_len=data.seq_len, mode=wc.ref_loss, pad_id=data.pad_id))
    G = cfg.train.global_batch_tokens // data.seq_len  # the run's global batch: phi's group size
    with torch.random.fork_rng(devices=[]):  # phi's init, as the weighter draws it
        torch.manual_seed(cfg.train.seed + 1)
        net = WeightingNet(wc.net, tok.get_vocab_size(), len(names))
    kind, _, arg = variant.partition(":")
    lr = wc.lr * (float(arg) if kind == "lr" else 1.0)
    domain = list(net.domain.parameters()) if net.domain is not None else []
    groups = [{"params": [p for n, p in net.named_parameters() if not n.startswith("domain.")]},
              {"params": domain, "lr": lr * (float(arg) if kind == "domain-lr" else 1.0)}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=wc.weight_decay)
    ema = torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(float(arg))) if kind == "ema" else None
    buf: list[tuple[np.ndarray, np.ndarray]] = []
    pool = np.arange(len(data))
    for r in recs:
        drawn = rng.choice(pool, size=len(r.ids), replace=False)
        if not np.array_equal(drawn, r.ids):
            raise SystemExit(f"{run}: the replayed draw differs from the run's at stage {r.stage} (another pool?)")
        rng.choice(n_ref, size=min(wc.ref_batch_size, n_ref), replace=False)
        buf.append((r.ids, r.target))
        all_ids = np.concatenate([b[0] for b in buf])
        all_t = np.concatenate([b[1] for b in buf])
        if kind == "shrink":
            all_t = shrunk(all_t, data.domain_ids[all_ids], float(arg))
        net.train()
        for _ in range(wc.phi_steps):
            pick = rng.choice(len(all_ids), size=min(G, len(all_ids)), replace=False)
            b = data.batch(all_ids[pick])
            W = weights_from_scores(net(b.input_ids, b.n_tokens, b.domain_ids), wc.temperature, wc.floor)
            loss = phi_objective(W, torch.from_numpy(all_t[pick]), wc.kl)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), wc.grad_clip)
            opt.step()
            if ema is not None:
                ema.update_parameters(net)
    if ema is not None:
        net = ema.module
    probes = probe_ids(data.domain_ids, min(wc.probe_size, len(data)))
    pb = data.batch(probes)

    def means(m: torch.nn.Module) -> dict[str, float]:
        m.eval()
        with torch.no_grad():
            w = weights_from_scores(m(pb.input_ids, pb.n_tokens, pb.domain_ids).double(), wc.temperature,
                                    wc.floor).numpy()
        d = names[data.domain_ids[probes]]
        return {g: float(w[d == g].mean()) for g in np.unique(d)}

    saved = load_weighting_net(run / "weighting" / f"stage_{wc.stages - 1}")
    return means(net), means(saved)


def fmt(m: dict[str, float]) -> str:
    return " ".join(f"{g}:{m[g]:.2f}" for g in sorted(m, key=lambda g: -m[g])[:4])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--variants", nargs="+", default=["run", "shrink:16", "domain-lr:0.1"])
    a = ap.parse_args()
    firsts = {v: 0 for v in a.variants}
    for run in a.runs:
        for v in a.variants:
            got, saved = replay(run, v)
            rank = sorted(got, key=lambda g: -got[g]).index(a.target) + 1
            firsts[v] += rank == 1
            extra = f"   (saved: {fmt(saved)})" if v == "run" else ""
            print(f"{run.parent.name}/{run.name} {v}: {a.target} {rank}  {fmt(got)}{extra}", flush=True)
    print("target first: " + ", ".join(f"{v} {n} of {len(a.runs)}" for v, n in firsts.items()))


if __name__ == "__main__":
    main()
