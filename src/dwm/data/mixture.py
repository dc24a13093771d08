"""Static domain mixtures as selection manifests: the same token budget, drawn from the domains in fixed shares.

`mixture_ids(domain_ids, domains, shares, n, seed)` returns n sample ids in a seeded random order: round(share*n)
from each named domain (without replacement while the domain has enough rows, else cycling through a fresh
permutation), and the remainder uniformly from the other domains. `dwm train --selection` trains on them in that
order. Used for the headroom oracle of the DWM benchmark (best static mixture at the same budget) and the demo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dwm.errors import UserError


def parse_shares(spec: str) -> dict[str, float]:
    """"books=0.5,news=0.1" -> {"books": 0.5, "news": 0.1}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"mixture {spec!r}: expected domain=share pairs, got {part!r}") from None
    return out


def _take(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    reps = -(-k // len(rows)) if k else 0
    return np.concatenate([rng.permutation(rows) for _ in range(reps)])[:k] if reps else rows[:0]


def mixture_ids(domain_ids: np.ndarray, domains: list[str], shares: dict[str, float], n: int,
                seed: int = 0) -> np.ndarray:
    """n sample ids: each named domain's share, the rest uniform over the unnamed domains, shuffled (seeded)."""
    unknown = sorted(set(shares) - set(domains))
    if unknown:
        raise UserError(f"mixture names unknown domain(s) {', '.join(unknown)} (have: {', '.join(domains)})")
    if any(s < 0 for s in shares.values()) or sum(shares.values()) > 1 + 1e-9:
        raise UserError(f"mixture shares must be >= 0 and sum to at most 1, got {shares}")
    rng = np.random.default_rng([seed, 0x313])
    parts, used = [], 0
    for name, share in sorted(shares.items()):
        k = round(share * n)
        rows = np.flatnonzero(domain_ids == domains.index(name))
        if k and not len(rows):
            raise UserError(f"mixture: domain {name} has no rows")
        parts.append(_take(rows, k, rng))
        used += k
    if n - used > 0:
        rest = np.flatnonzero(~np.isin(domain_ids, [domains.index(d) for d in shares]))
        if not len(rest):
            raise UserError(f"mixture {shares} leaves {n - used} samples to unnamed domains, and there are none")
        parts.append(_take(rest, n - used, rng))
    return rng.permutation(np.concatenate(parts))[:n].astype(np.int64)


def write_manifest(ids: np.ndarray, path: str | Path, columns: dict[str, pa.Array] | None = None,
                   metadata: dict[bytes, bytes] | None = None) -> Path:
    """A selection manifest: `sample_id` (the training order), optional extra columns (one value per id) and
    parquet schema metadata (`dwm select` records its method, settings and the data's fingerprint there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"sample_id": pa.array(ids, pa.int64()), **(columns or {})})
    pq.write_table(table.replace_schema_metadata(metadata) if metadata else table, path)
    return path
