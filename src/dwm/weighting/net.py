"""The weighting network f_phi: a sample's tokens (and optional features) -> a score; scores -> weights.

Architecture: token embedding + learned positions -> `layers` pre-norm transformer encoder layers (padding masked
out via n_tokens, input truncated to max_len) -> masked mean pool -> [+ domain embedding] [+ loss feature]
[-> self-attention across the batch's pooled vectors] -> MLP -> score. The MLP's output layer starts at zero, so
every initial score is 0 and the initial weights are exactly uniform (w == 1): training starts from plain training.

Weights: w = B * softmax(s / tau), then w = (1 - floor) * w + floor (sum stays B; floor mixes in uniform).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dwm.errors import UserError
from dwm.weighting.config import WeightingNetConfig


class EncoderBlock(nn.Module):
    """Pre-norm transformer block on F.scaled_dot_product_attention. nn.TransformerEncoderLayer's inference fast
    path spends most of its time in a masked softmax on CPU (0.28 s vs 0.16 s for 16 x 256 tokens here), and SDPA
    picks fused kernels on GPUs; one code path for training and scoring."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, D]; keep [B, L] bool (True = a real token that may be attended to) or None."""
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        mask = keep[:, None, None, :] if keep is not None else None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(B, L, D)), self.dropout, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), self.dropout, self.training)


class WeightingNet(nn.Module):
    """f_phi(x) -> s. `forward(input_ids, n_tokens, domain_ids=None, lm_loss=None) -> scores [B]`.

    lm_embedding: the LM's input embedding matrix [V, d] (only with cfg.init_from_lm_embedding); it is copied into
    a trainable embedding, followed by a learned Linear(d, width) when d != width.
    Note for batch_context under DDP: the batch the net attends across is what is passed in (this rank's share).
    """

    def __init__(self, cfg: WeightingNetConfig, vocab_size: int, n_domains: int = 0,
                 lm_embedding: torch.Tensor | None = None):
        super().__init__()
        if cfg.width % cfg.heads:
            raise UserError(f"weighting net width {cfg.width} must be divisible by heads {cfg.heads}")
        if cfg.use_domain_feature and n_domains <= 0:
            raise UserError("use_domain_feature needs the number of domains (n_domains > 0)")
        if cfg.init_from_lm_embedding and lm_embedding is None:
            raise UserError("init_from_lm_embedding needs the LM's input embedding")
        self.cfg, self.vocab_size, self.n_domains = cfg, vocab_size, n_domains
        self.lm_embedding_dim = 0
        if cfg.init_from_lm_embedding:
            assert lm_embedding is not None
            if lm_embedding.shape[0] != vocab_size:
                raise UserError(f"LM embedding has {lm_embedding.shape[0]} rows, vocabulary has {vocab_size}")
            self.lm_embedding_dim = int(lm_embedding.shape[1])
            self.embed = nn.Embedding(vocab_size, self.lm_embedding_dim)
            with torch.no_grad():
                self.embed.weight.copy_(lm_embedding.detach().float())
            self.proj = (nn.Linear(self.lm_embedding_dim, cfg.width, bias=False)
                         if self.lm_embedding_dim != cfg.width else nn.Identity())
        else:
            self.embed = nn.Embedding(vocab_size, cfg.width)
            nn.init.normal_(self.embed.weight, std=0.02)
            self.proj = nn.Identity()
        self.pos = nn.Parameter(torch.zeros(cfg.max_len, cfg.width))
        nn.init.normal_(self.pos, std=0.02)
        self.encoder = nn.ModuleList(EncoderBlock(cfg.width, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.domain = nn.Embedding(n_domains, cfg.width) if cfg.use_domain_feature else None
        self.loss_proj = nn.Linear(1, cfg.width) if cfg.use_loss_feature else None
        self.batch_attn = EncoderBlock(cfg.width, cfg.heads, cfg.dropout) if cfg.batch_context else None
        self.head = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, cfg.width), nn.GELU(),
                                  nn.Linear(cfg.width, 1))
        nn.init.zeros_(self.head[-1].weight)  # initial scores 0 -> initial weights uniform
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, input_ids: torch.Tensor, n_tokens: torch.Tensor, domain_ids: torch.Tensor | None = None,
                lm_loss: torch.Tensor | None = None) -> torch.Tensor:
        L = min(input_ids.shape[1], self.cfg.max_len)
        ids = input_ids[:, :L].long()
        n = n_tokens.to(ids.device).long().clamp(1, L)  # an empty row still pools its first token
        pad = torch.arange(L, device=ids.device).unsqueeze(0) >= n.unsqueeze(1)  # True = ignore
        x = self.proj(self.embed(ids)) + self.pos[:L]
        for block in self.encoder:
            x = block(x, ~pad)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        h = self.norm((x * keep).sum(1) / keep.sum(1))
        if self.domain is not None:
            if domain_ids is None:
                raise UserError("this weighting net uses the domain feature: pass domain_ids")
            h = h + self.domain(domain_ids.to(ids.device).long())
        if self.loss_proj is not None:
            if lm_loss is None:
                raise UserError("this weighting net uses the loss feature: pass lm_loss")
            h = h + self.loss_proj(lm_loss.detach().to(h.dtype).unsqueeze(-1))
        if self.batch_attn is not None:
            h = self.batch_attn(h.unsqueeze(0)).squeeze(0)  # the batch as one sequence
        return self.head(h).squeeze(-1)


def weights_from_scores(scores: torch.Tensor, temperature: float = 1.0, floor: float = 0.0,
                        batch_size: int | None = None) -> torch.Tensor:
    """w = B * softmax(s / tau), then (1 - floor) * w + floor. Sum == B; s == 0 gives w == 1.

    `scores` is the whole (global) batch; batch_size overrides B (default len(scores)).
    """
    if not temperature > 0:
        raise UserError(f"weighting temperature must be > 0, got {temperature}")
    if not 0.0 <= floor <= 1.0:
        raise UserError(f"weighting floor must be in [0, 1], got {floor}")
    B = batch_size if batch_size is not None else scores.shape[0]
    w = B * torch.softmax(scores / temperature, dim=0)
    return (1.0 - floor) * w + floor * (B / scores.shape[0])


def save_weighting_net(net: WeightingNet, stem: str | Path) -> tuple[Path, Path]:
    """Write stem.safetensors (parameters) and stem.json (config + sizes); returns both paths."""
    from safetensors.torch import save_file

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(st))
    js.write_text(json.dumps({"format": "dwm-weighting-net/1", "net": asdict(net.cfg), "vocab_size": net.vocab_size,
                              "n_domains": net.n_domains, "lm_embedding_dim": net.lm_embedding_dim}, indent=2))
    return st, js


def load_weighting_net(stem: str | Path, map_location: str | torch.device = "cpu") -> WeightingNet:
    """Inverse of save_weighting_net (stem with or without a suffix)."""
    from safetensors.torch import load_file

    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".safetensors") else stem
    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not (st.is_file() and js.is_file()):
        raise UserError(f"weighting model not found: need {st} and {js}")
    try:
        meta = json.loads(js.read_text())
        known = {f.name for f in fields(WeightingNetConfig)}
        cfg = WeightingNetConfig(**{k: v for k, v in meta["net"].items() if k in known})
        emb = (torch.zeros(meta["vocab_size"], meta["lm_embedding_dim"])
               if cfg.init_from_lm_embedding else None)
        net = WeightingNet(cfg, meta["vocab_size"], meta.get("n_domains", 0), lm_embedding=emb)
        net.load_state_dict(load_file(str(st), device=str(map_location)))
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot load weighting model {stem}: {e}") from e
    return net.to(map_location)


def fresh_net(ctx: Any, cfg: WeightingNetConfig, n_domains: int) -> WeightingNet:
    """A new weighting net for a run (`ctx`: a TrainContext): seeded from the run's seed without touching the LM's
    RNG streams; with init_from_lm_embedding its token embedding starts from the LM's (gathered under fsdp)."""
    from dwm.nn import sharding

    emb = (sharding.full_tensor(ctx.model.get_input_embeddings().weight.detach())
           if cfg.init_from_lm_embedding else None)
    with torch.random.fork_rng(devices=[]):  # phi's init must not shift the LM's RNG streams
        torch.manual_seed(ctx.seed + 1)
        return WeightingNet(cfg, ctx.plan.vocab_size, n_domains, lm_embedding=emb)
