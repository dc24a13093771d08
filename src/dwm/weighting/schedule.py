"""When phi learns: the stage schedule, and replay (transfer) of a finished run's stage models.

- staged (default, the paper's): training is split into K stages of T/K LM steps. At the first step of stage k,
  phi takes M bi-level updates against the current LM, is saved as `weighting/stage_k`, scores the probe set, and
  is frozen for the rest of the stage.
- interleaved: one bi-level update every `interval` LM steps; stage boundaries still save a snapshot and probes.
- replay (`weighting.mode = RUN_DIR`, transfer): the source run's stage models are loaded in turn, stage k at the
  same *fraction* of training as in the source run, with no bi-level updates, on any data selection and any LM
  size (same tokenizer). With `keep_learning`, each replayed stage model is the starting point of M updates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dwm import rundir
from dwm.errors import UserError
from dwm.weighting.net import WeightingNet, load_weighting_net


class StageSource:
    """The stage models of a finished DWM run, for replay (transfer)."""

    def __init__(self, run_dir: str | Path, tokenizer_sha: str):
        self.dir = rundir.RunDir(run_dir).weighting
        stems = rundir.stage_files(self.dir, ".json")
        if not stems:
            raise UserError(f"--weighting {run_dir}: no weighting/stage_*.json there (not a DWM run, or it has "
                            f"not reached its first stage)")
        self.meta = [json.loads(p.read_text()) for p in stems]
        self.stems = [p.with_suffix("") for p in stems]
        self.n_stages = int(self.meta[0].get("dwm", {}).get("stages", len(stems)))
        src_sha = self.meta[0].get("dwm", {}).get("tokenizer_sha256")
        if src_sha and src_sha != tokenizer_sha:
            raise UserError(f"--weighting {run_dir}: its weighting model reads another tokenizer's ids; "
                            f"transfer needs the same tokenizer (prepare the new data with its tokenizer.json)")

    def stem_for(self, stage: int) -> Path:
        """Stage `stage` of the source, or its last saved stage if the source stopped earlier."""
        known = {int(m["dwm"]["stage"]): s for m, s in zip(self.meta, self.stems)}
        return known[max(k for k in known if k <= stage)] if any(k <= stage for k in known) else self.stems[0]

    def domains(self) -> list[str]:
        return list(self.meta[0].get("dwm", {}).get("domains", []))

    def setting(self, key: str, default: float) -> float:
        """A replayed schedule is replayed as it was learned: the source's temperature and floor, not this
        config's."""
        return float(self.meta[0].get("dwm", {}).get(key, default))

    def load(self, stage: int, domains: list[str]) -> WeightingNet:
        """Stage `stage`'s weighting model (on the CPU); refused when it reads domain ids of another list."""
        net = load_weighting_net(self.stem_for(stage), map_location="cpu")
        if net.cfg.use_domain_feature and self.domains() != domains:
            raise UserError(f"--weighting: the source weighting model uses domain ids of {self.domains()}, "
                            f"this data has {domains}; replay needs the same domain list")
        return net


class StageSchedule:
    """Which stage a step is in, which stages learn, and how many bi-level updates a step takes."""

    def __init__(self, n_stages: int, total_steps: int, *, schedule: str = "staged", interval: int = 25,
                 uniform_stages: int = 0, frozen_stages: int = 0, updates_per_stage: int = 1,
                 update_fraction: float = 0.04):
        if n_stages < 1:
            raise UserError(f"weighting.stages must be >= 1, got {n_stages}")
        self.n_stages, self.total_steps = n_stages, max(1, total_steps)
        self.schedule, self.interval = schedule, interval
        self.uniform_stages, self.frozen_stages = uniform_stages, frozen_stages
        steps_per_stage = self.total_steps / n_stages
        self.updates_per_stage = (updates_per_stage if updates_per_stage > 0
                                  else max(1, round(update_fraction * steps_per_stage)))

    @classmethod
    def from_config(cls, cfg: Any, n_stages: int, total_steps: int) -> StageSchedule:
        """The schedule a WeightingConfig describes, with n_stages (a replayed run's own number, or cfg.stages)."""
        a = cfg.advanced
        return cls(n_stages, total_steps, schedule=cfg.schedule, interval=cfg.interval,
                   uniform_stages=a.uniform_stages, frozen_stages=a.frozen_stages,
                   updates_per_stage=a.updates_per_stage, update_fraction=a.update_fraction)

    def stage_of(self, step: int) -> int:
        return min(self.n_stages - 1, step * self.n_stages // self.total_steps)

    def learns(self, k: int) -> bool:
        """Whether stage k takes bi-level updates (not one of the uniform first or frozen last stages)."""
        return self.uniform_stages <= k < self.n_stages - self.frozen_stages

    def updates_at_boundary(self, step: int) -> int:
        """Bi-level updates at the first step of a learning stage: M (staged); interleaved, the boundary step is an
        ordinary step of the every-`interval` rhythm."""
        if self.schedule == "staged":
            return self.updates_per_stage
        return 1 if step % self.interval == 0 else 0

    def updates_within(self, step: int) -> bool:
        """Whether a step inside a learning stage (not its first) takes an update (interleaved only)."""
        return self.schedule == "interleaved" and step % self.interval == 0

    def fraction(self, k: int) -> list[float]:
        return [k / self.n_stages, (k + 1) / self.n_stages]
