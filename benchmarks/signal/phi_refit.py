"""How much of the last stage's domain ranking is phi's fit, not the signal? Refit a finished DWM run's last
update offline: start from its stage K-2 weighting model (a fresh AdamW, the run's lr), take its phi steps on
groups drawn from the final buffer of probed samples (the last checkpoint's weighter state, as the run's objective:
sum_i w_i t_i / n + kl KL(w/n || uniform) per 16-sample group), with other draws of the groups, and print the
probe set's mean weight per domain each time, next to the saved stage model's and the buffer's own means.

    python benchmarks/signal/phi_refit.py RUN_DIR [--reps 4] [--fits 8x16 8x128]

A fit "SxG" takes S steps, each on the mean gradient of G buffer samples (G / 16 groups). Answer on the novels
seeds whose last stage missed books (5c3482d): seed 13's run drew misc first, the same data and start put books
first in 3 of 4 other draws at the run's 8x16 and 4 of 4 at 8x128; seed 7 3 of 4 / 2 of 4; seed 6 (whose buffer
ranks books fourth) 0 of 4 / 1 of 4; with the KL over a 16-sample stratified anchor instead of the groups
(--anchor-kl 16): 4 of 4, 1 of 4, 0 of 4 (docs/DECISIONS.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dwm.data.dataset import PreparedData
from dwm.run import load_config
from dwm.weighting.dwm_weighter import phi_objective, probe_ids, probed_records
from dwm.weighting.net import load_weighting_net, weights_from_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--fits", nargs="+", default=["8x16", "8x128"])
    ap.add_argument("--probe-size", type=int, default=200)
    ap.add_argument("--anchor-kl", type=int, default=0,
                    help="replace the in-group KL by one over this many samples of a domain-stratified anchor set "
                         "(every domain as present as in the probe set: a rare domain's extreme weight costs as "
                         "much as a common one's)")
    a = ap.parse_args()
    cfg = load_config(str(a.run / "config.toml"), [])
    wc = cfg.weighting
    data = PreparedData(cfg.data.dir, "train")
    names = np.array(data.domains)
    latest = (a.run / "checkpoints" / "LATEST").read_text().strip()
    buf = probed_records(torch.load(a.run / "checkpoints" / latest / "trainer_state.pt",
                                    weights_only=False)["weighter"])
    ids = np.concatenate([b.ids for b in buf])
    t = np.concatenate([b.target for b in buf])
    stems = sorted((a.run / "weighting").glob("stage_*.json"), key=lambda q: int(q.stem.split("_")[1]))
    probes = probe_ids(data.domain_ids, a.probe_size)
    pb = data.batch(probes)
    anchor = probe_ids(data.domain_ids, 2 * a.probe_size, seed=1)  # another stratified set than the reported one

    def ranking(net) -> str:
        net.eval()
        with torch.no_grad():
            w = weights_from_scores(net(pb.input_ids, pb.n_tokens, pb.domain_ids).double(), wc.temperature,
                                    wc.floor).numpy()
        d = names[data.domain_ids[probes]]
        m = {g: w[d == g].mean() for g in np.unique(d)}
        return " ".join(f"{g}:{m[g]:.2f}" for g in sorted(m, key=lambda g: -m[g])[:4])

    dom = names[data.domain_ids[ids]]
    means = {g: -t[dom == g].mean() for g in np.unique(dom)}
    print("buffer: mean signal -t per domain: " + " ".join(
        f"{g}:{means[g]:+.2f}(n{(dom == g).sum()})" for g in sorted(means, key=lambda g: -means[g])[:5]))
    print(f"saved {stems[-1].stem}: {ranking(load_weighting_net(stems[-1].with_suffix('')))}")
    G = 16
    for fit in a.fits:
        steps, group = (int(x) for x in fit.split("x"))
        for rep in range(a.reps):
            net = load_weighting_net(stems[-2].with_suffix(""))
            opt = torch.optim.AdamW(net.parameters(), lr=wc.lr, weight_decay=wc.weight_decay)
            rng = np.random.default_rng(rep)
            net.train()
            for _ in range(steps):
                pick = rng.choice(len(ids), group, replace=False)
                b = data.batch(ids[pick])
                loss = torch.zeros(())
                for j in range(0, group, G):
                    W = weights_from_scores(net(b.input_ids[j:j + G], b.n_tokens[j:j + G], b.domain_ids[j:j + G]),
                                            wc.temperature, wc.floor)
                    loss = loss + phi_objective(W, torch.from_numpy(t[pick[j:j + G]]), 0.0 if a.anchor_kl else wc.kl)
                loss = loss / (group // G)
                if a.anchor_kl:
                    ab = data.batch(anchor[rng.choice(len(anchor), a.anchor_kl, replace=False)])
                    Wa = weights_from_scores(net(ab.input_ids, ab.n_tokens, ab.domain_ids), wc.temperature, wc.floor)
                    loss = loss + phi_objective(Wa, torch.zeros_like(Wa), wc.kl)  # the KL term alone
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), wc.grad_clip)
                opt.step()
            how = f", KL over {a.anchor_kl} anchor samples" if a.anchor_kl else ""
            print(f"refit {fit}{how} from {stems[-2].stem}, draw {rep}: {ranking(net)}", flush=True)


if __name__ == "__main__":
    main()
