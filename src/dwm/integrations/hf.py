"""The Data Weighting Model in a transformers `Trainer` (docs/LIBRARY.md):

    weighter = dwm.DWM(model, optimizer, reference=texts, tokenizer=tok)
    trainer = DWMTrainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None), dwm=weighter)
    trainer.train()

`DWMTrainer.compute_loss` takes phi's bi-level updates when the stage schedule has them (the batch joins the
samples they probe) and minimises the DWM-weighted mean of the per-sample losses; `DWMCallback` (added by
DWMTrainer) logs the weights' statistics, saves the DWM's state into every checkpoint folder (`dwm_state.pt`) and
phi into `output_dir/weighting/` at the end. Batches need `input_ids`, optionally `attention_mask` (right padding)
and `domain_ids` (when the DWM reads the domain). The DWM must be built with the optimizer the Trainer uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from dwm.nn.losses import per_sample_nll
from dwm.weighting.loop import DWM


class DWMCallback(TrainerCallback):
    """Logs mean weight per domain, saves the DWM with each checkpoint and phi at the end."""

    def __init__(self, weighter: DWM):
        self.dwm = weighter
        self.last: dict[str, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs.update({**self.last, "dwm_updates": self.dwm.learner.n_updates})

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            torch.save(self.dwm.state_dict(), ckpt / "dwm_state.pt")

    def on_train_end(self, args, state, control, **kwargs):
        self.dwm.save(Path(args.output_dir) / "weighting")


class DWMTrainer(Trainer):
    """A transformers Trainer whose loss is the DWM-weighted mean of per-sample losses (see the module docstring)."""

    def __init__(self, *args: Any, dwm: DWM, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dwm = dwm
        self.dwm_callback = DWMCallback(dwm)
        self.add_callback(self.dwm_callback)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        n_tokens = mask.sum(1) if mask is not None else torch.full((len(ids),), ids.shape[1], device=ids.device)
        dom = inputs.get("domain_ids")
        if model.training:
            self.dwm.maybe_update(self.state.global_step, self.state.max_steps, ids, n_tokens, dom)
        outputs = model(input_ids=ids, attention_mask=mask)
        nll = per_sample_nll(outputs.logits, ids, n_tokens)
        w = self.dwm.weights(ids, n_tokens, dom).to(nll.device) if model.training else torch.ones_like(nll)
        if dom is not None and model.training:
            self.dwm_callback.last = {f"dwm_weight/{self.dwm.domains[int(d)]}": float(w[dom == d].mean())
                                      for d in torch.unique(dom)}
        loss = (w * nll).mean()
        return (loss, outputs) if return_outputs else loss
