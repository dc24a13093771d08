"""What the hypergradient said at each stage of finished DWM runs: per stage, the target domain's rank among the
domains by mean signal -dL/dw (std-normalised per update, phi's scale) and its margin over the other domains' mean,
then the margin's mean ± s.e. over the runs; next to the weighting model's own rank of the domain (probes/).

    python benchmarks/signal/signal_by_stage.py books RUN_DIR [RUN_DIR ...] [--min-n 8]

Reads signal/stage_k.parquet (runs from 5c3482d on); for older runs, the probed samples still in the last
checkpoint's buffer (all stages when weighting.buffer_stages >= stages). Domains with fewer than --min-n probed
samples in a stage are left out of its ranking (a domain seen 1-5 times has a mean too noisy to rank).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from dwm.data.dataset import PreparedData
from dwm.run import load_config
from dwm.weighting.dwm_weighter import probed_records


def stage_signal(run: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """stage -> (domain names, signal) of the samples that stage's updates probed."""
    files = sorted((run / "signal").glob("stage_*.parquet"))
    if files:
        out = {}
        for f in files:
            t = pq.read_table(f, columns=["domain", "signal"]).to_pydict()
            out[int(f.stem.split("_")[1])] = (np.array(t["domain"]), np.array(t["signal"]))
        return out
    latest = (run / "checkpoints" / "LATEST").read_text().strip()
    state = torch.load(run / "checkpoints" / latest / "trainer_state.pt", weights_only=False)["weighter"]
    data = PreparedData(load_config(str(run / "config.toml"), []).data.dir, "train")
    names = np.array(data.domains)
    out: dict[int, tuple[list, list]] = {}
    for b in probed_records(state):
        d, s = out.setdefault(b.stage, ([], []))
        d.extend(names[data.domain_ids[b.ids]])
        s.extend(-b.target)
    return {k: (np.array(d), np.array(s)) for k, (d, s) in out.items()}


def phi_rank(run: Path, k: int, target: str) -> int | None:
    p = run / "probes" / f"stage_{k}.parquet"
    if not p.is_file():
        return None
    t = pq.read_table(p, columns=["domain", "weight"]).to_pydict()
    d, w = np.array(t["domain"]), np.array(t["weight"])
    means = {g: w[d == g].mean() for g in np.unique(d)}
    return sorted(means, key=lambda g: -means[g]).index(target) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--min-n", type=int, default=8)
    a = ap.parse_args()
    margins: dict[int, list[float]] = {}
    for run in a.runs:
        cells = []
        for k, (dom, sig) in sorted(stage_signal(run).items()):
            means = {g: sig[dom == g].mean() for g in np.unique(dom) if (dom == g).sum() >= a.min_n}
            if a.target not in means:
                cells.append(f"s{k}: -")
                continue
            order = sorted(means, key=lambda g: -means[g])
            margins.setdefault(k, []).append(means[a.target] - np.mean([v for g, v in means.items() if g != a.target]))
            cells.append(f"s{k}: {order.index(a.target) + 1} (top {order[0]}; phi {phi_rank(run, k, a.target)})")
        print(f"{run.name}: " + "  ".join(cells))
    print(f"{a.target}'s mean signal minus the other domains' mean (n >= {a.min_n}), by stage, over runs:")
    for k, m in sorted(margins.items()):
        v = np.array(m)
        se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
        print(json.dumps({"stage": k, "margin": round(float(v.mean()), 3), "se": round(float(se), 3), "runs": len(v)}))


if __name__ == "__main__":
    main()
