"""Shared by the signal probes: a finished run's checkpoint as the bi-level update sees it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from dwm.data.dataset import PreparedData
from dwm.data.passages import PassageSet
from dwm.run import load_config
from dwm.rundir import RunDir
from dwm.train.model import build_model
from dwm.train.trainer import make_optimizer


@dataclass
class Checkpoint:
    cfg: Any
    data: PreparedData
    tokenizer: Tokenizer
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr: float  # the lookahead's: the checkpoint's lr, floored at the schedule's minimum (as DWMWeighter does)

    def reference(self, path: str | Path) -> PassageSet:
        return PassageSet(path, self.tokenizer, max_len=256, mode="passage", pad_id=self.data.pad_id)


def load_checkpoint(ckpt: Path) -> Checkpoint:
    """CKPT_DIR = RUN_DIR/checkpoints/step_N: its model (eval mode), its AdamW state, the run's data and config."""
    run = RunDir(ckpt.parent.parent)
    cfg = load_config(str(run.config), [])
    data = PreparedData(cfg.data.dir, "train")
    tok = Tokenizer.from_file(str(run.tokenizer))
    model = build_model(str(ckpt / "model"), tok.get_vocab_size()).eval()
    opt = make_optimizer(model, cfg.optim)
    opt.load_state_dict(torch.load(ckpt / "trainer_state.pt", weights_only=False)["optimizer"])
    lr = max(opt.param_groups[0]["lr"], cfg.optim.lr * cfg.optim.min_lr_ratio)
    return Checkpoint(cfg, data, tok, model, opt, lr)
