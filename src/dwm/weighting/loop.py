"""`dwm.DWM`: the Data Weighting Model in anyone's training loop, with no prepared directory, no trainer and no run
directory (docs/LIBRARY.md).

    dwm = DWM(model, optimizer, reference=texts, tokenizer=tok, domains=["books", "code"])
    for step, (ids, dom) in enumerate(loader):
        dwm.maybe_update(step, total_steps, ids, domain_ids=dom)   # phi's bi-level updates, on the stage schedule
        w = dwm.weights(ids, domain_ids=dom)                       # [B], mean 1
        loss = (w * per_sample_loss).mean(); loss.backward(); optimizer.step()

or, resampling: `keep = dwm.select(candidate_ids, n)` picks n of the candidates by phi's scores (Gumbel top-k).
It is the same scorer, probe, learner and schedule as `dwm train` (dwm.weighting.*) with the library defaults
(`WeightingConfig`); the samples a bi-level update probes are drawn from the last `memory` samples the loop has
shown it (the trainer draws them from the whole training split). One process: weights are normalised over the
batch given. The model must return `.logits` for `model(input_ids=...)` (any HF causal LM; wrap others with
`LogitsModel`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from dwm import config as C
from dwm.data.batch import Batch
from dwm.data.passages import PassageSet
from dwm.errors import UserError
from dwm.nn.sampling import gumbel_top_k
from dwm.weighting.config import WeightingConfig
from dwm.weighting.learner import PhiLearner
from dwm.weighting.net import WeightingNet, save_weighting_net
from dwm.weighting.probe import BilevelProbe, probed_records
from dwm.weighting.schedule import StageSchedule
from dwm.weighting.scorer import Scorer


class LogitsModel(torch.nn.Module):
    """A model whose forward returns the logits tensor (litgpt, torchtune, a hand-written LM) seen as an HF one:
    `forward(input_ids=...)` returns an object with `.logits`. Shares the wrapped model's parameters."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self.model(input_ids))


class MemoryRows:
    """The samples the loop has shown the DWM, by id (ids count up): what its bi-level updates probe. Keeps the
    last `capacity` and every row phi's evidence buffer still refers to."""

    def __init__(self, capacity: int, pad_id: int = 0):
        self.capacity, self.pad_id, self.next_id = capacity, pad_id, 0
        self.rows: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (real token ids on the CPU, domain id)

    def add(self, batch: Batch) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + len(batch), dtype=np.int64)
        for i, x, n, d in zip(ids, batch.input_ids, batch.n_tokens, batch.domain_ids):
            self.rows[int(i)] = (x[:int(n)].detach().cpu(), int(d))
        self.next_id += len(batch)
        return ids

    def pool(self) -> np.ndarray:
        return np.array([i for i in self.rows if i >= self.next_id - self.capacity], dtype=np.int64)

    def prune(self, keep: set[int]) -> None:
        for i in [i for i in self.rows if i < self.next_id - self.capacity and i not in keep]:
            del self.rows[i]

    def batch(self, ids: Sequence[int]) -> Batch:
        rows = [self.rows[int(i)] for i in ids]
        T = max((len(x) for x, _ in rows), default=0)
        out = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        for r, (x, _) in enumerate(rows):
            out[r, :len(x)] = x
        return Batch(out, torch.tensor([len(x) for x, _ in rows]), torch.as_tensor(np.asarray(ids, np.int64)),
                     torch.tensor([d for _, d in rows], dtype=torch.long))


class DWM:
    """See the module docstring. `reference`: the target passages, texts (with `tokenizer`, a `tokenizers` or HF
    tokenizer) or token-id lists; `domains`: the domain names (or their number) that `domain_ids` index, None for
    no domain feature; `options`: any `[weighting]` key (`temperature=0.5`, `net={"width": 64}`, ...)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, reference: Sequence[Any],
                 tokenizer: Any = None, *, domains: Sequence[str] | int | None = None, seed: int = 0,
                 micro_batch_size: int = 8, max_len: int = 256, pad_id: int = 0, memory: int = 512,
                 vocab_size: int | None = None, **options: Any):
        self.cfg = cfg = WeightingConfig(mode="dwm")
        if domains is None:
            cfg.net.use_domain_feature = False
        C.apply_dict(cfg, options, prefix="", command="dwm.DWM")
        C.validate(cfg)
        self.model, self.optimizer, self.seed = model, optimizer, seed
        n_dom = domains if isinstance(domains, int) else len(domains or [])
        self.domains = list(domains) if isinstance(domains, (list, tuple)) else [str(i) for i in range(n_dom)]
        p = next(model.parameters())
        vocab = vocab_size or model.get_input_embeddings().num_embeddings
        with torch.random.fork_rng(devices=[]):  # phi's init must not shift the loop's RNG streams
            torch.manual_seed(seed + 1)
            net = WeightingNet(cfg.net, vocab, n_dom).to(p.device, dtype=p.dtype)
        self.scorer = Scorer(cfg.temperature, cfg.floor, cfg.net.use_loss_feature)
        self.scorer.bind(net, p.device, micro_batch_size)
        if reference and isinstance(reference[0], str):
            if tokenizer is None:
                raise UserError("DWM: reference texts need a tokenizer= (or give token-id lists)")
            ref = PassageSet(list(reference), tokenizer, max_len=max_len, mode=cfg.advanced.ref_loss, pad_id=pad_id)
        else:
            ref = PassageSet.from_token_ids([list(map(int, r)) for r in reference], max_len, pad_id)
        self.rows = MemoryRows(memory, pad_id)
        self.rng = np.random.default_rng([seed, 0xD3])
        self.select_rng = np.random.default_rng([seed, 0x5E1])
        self.probe = BilevelProbe.from_config(self.scorer, ref, cfg, micro_batch_size)
        self.learner = PhiLearner.from_config(self.scorer, self.probe, self.rng, cfg.advanced)
        self.schedule: StageSchedule | None = None
        self.stage, self.last_step = -1, -1
        self.history: list[dict[str, Any]] = []  # every bi-level update's record (as metrics.jsonl's "bilevel")
        self._view = SimpleNamespace(data=self.rows, model=model, optimizer=optimizer, autocast_dtype=None)

    @property
    def net(self) -> WeightingNet:
        return self.scorer.net

    def _batch(self, input_ids: torch.Tensor, n_tokens: Any = None, domain_ids: Any = None) -> Batch:
        B, T = input_ids.shape
        n = torch.full((B,), T) if n_tokens is None else torch.as_tensor(n_tokens)
        d = torch.zeros(B, dtype=torch.long) if domain_ids is None else torch.as_tensor(domain_ids)
        if self.scorer.net.cfg.use_domain_feature and domain_ids is None:
            raise UserError("DWM: this weighting model reads the domain: pass domain_ids")
        return Batch(input_ids, n.long(), torch.full((B,), -1), d.long())

    def _remember(self, batch: Batch) -> np.ndarray:
        ids = self.rows.add(batch)
        self.rows.prune({int(i) for b in self.learner.buffer for i in b.ids})
        self.learner.G = self.probe.G = len(batch)  # the lookahead's batch: the loop's
        return ids

    def weights(self, input_ids: torch.Tensor, n_tokens: Any = None, domain_ids: Any = None,
                losses: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample weights [B] (float32, sum B, no graph) of a batch: B softmax(phi's scores / tau)."""
        batch = self._batch(input_ids, n_tokens, domain_ids)
        self._remember(batch)
        b = batch.to(self.scorer.device)
        if self.scorer.loss_feature and losses is None:
            losses = self.scorer.lm_losses(self.model, b)
        return self.scorer.batch_weights(b, losses).float()

    def select(self, input_ids: torch.Tensor, n: int, n_tokens: Any = None, domain_ids: Any = None) -> np.ndarray:
        """Indices (sorted) of the n of these candidates to train on, drawn without replacement with probability
        softmax(phi's scores / tau) (Gumbel top-k): the resample use; train the kept samples at weight 1."""
        ids = self._remember(self._batch(input_ids, n_tokens, domain_ids))
        self.learner.G = self.probe.G = n
        scores = self.scorer.score_ids(self.rows, ids, self.model).astype(np.float64)
        p = self.scorer.weights(torch.from_numpy(scores)).numpy() / len(scores)
        return gumbel_top_k(np.log(np.clip(p, 1e-300, None)), n, self.select_rng)

    def lookahead_lr(self) -> float:
        """weighting.advanced.lookahead_lr, else the optimizer's current lr floored at a tenth of its initial one (so a
        stage starting inside warm-up still looks ahead)."""
        if self.cfg.advanced.lookahead_lr > 0:
            return self.cfg.advanced.lookahead_lr
        g = self.optimizer.param_groups[0]
        return max(float(g["lr"]), 0.1 * float(g.get("initial_lr", g["lr"])))

    def maybe_update(self, step: int, total_steps: int, input_ids: torch.Tensor | None = None, n_tokens: Any = None,
                     domain_ids: Any = None) -> int:
        """Before optimizer step `step` of `total_steps`: phi's bi-level updates when the schedule has them (at a
        learning stage's first step; interleaved, every `interval` steps). The batch, if given, joins the samples
        the updates probe. Returns the number of updates taken (once per step, however often it is called)."""
        if input_ids is not None:
            self._remember(self._batch(input_ids, n_tokens, domain_ids))
        if step == self.last_step:
            return 0
        self.last_step = step
        if self.schedule is None or self.schedule.total_steps != max(1, total_steps):
            self.schedule = StageSchedule.from_config(self.cfg, self.cfg.stages, total_steps)
        s, k, n = self.schedule, self.schedule.stage_of(step), 0
        if k != self.stage:
            self.stage = k
            if s.learns(k):
                self.learner.enter_stage(k)
                n = s.updates_at_boundary(step)
        elif s.learns(k) and s.updates_within(step):
            n = 1
        pool = self.rows.pool()
        for _ in range(n if len(pool) else 0):
            rec, _ = self.learner.update(self._view, pool, self.lookahead_lr(), step, k)
            self.history.append(rec)
        return n if len(pool) else 0

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        keep = sorted({int(i) for b in self.learner.buffer for i in b.ids})
        return {"net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
                **self.learner.state_dict(), "select_rng": self.select_rng.bit_generator.state,
                "stage": self.stage, "last_step": self.last_step, "n_updates": self.learner.n_updates,
                "n_skipped": self.learner.n_skipped, "rows": {i: self.rows.rows[i] for i in keep},
                "next_id": self.rows.next_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.learner.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.select_rng.bit_generator.state = state["select_rng"]
        self.stage, self.last_step = int(state["stage"]), int(state["last_step"])
        self.learner.n_updates, self.learner.n_skipped = int(state["n_updates"]), int(state["n_skipped"])
        self.learner.buffer = probed_records(state)
        self.rows.rows.update(state["rows"])
        self.rows.next_id = max(self.rows.next_id, int(state["next_id"]))

    def save(self, out_dir: str | Path) -> Path:
        """phi as OUT_DIR/stage_k.{safetensors,json} (k = the current stage; loadable by
        dwm.weighting.net.load_weighting_net). Returns the stem."""
        stem = Path(out_dir) / f"stage_{max(self.stage, 0)}"
        _, js = save_weighting_net(self.net, stem)
        doc = json.loads(js.read_text())
        doc["dwm"] = {"stage": self.stage, "temperature": self.scorer.temperature, "floor": self.scorer.floor,
                      "domains": self.domains, "updates": self.learner.n_updates, "skipped": self.learner.n_skipped}
        js.write_text(json.dumps(doc, indent=2))
        return stem
