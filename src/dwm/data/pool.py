"""The pool of prepared shards (`dwm prepare --pool --out POOL SHARD...`): `make_pool` checks that the shards agree
(seq_len, vocab, dtype, pad/eos ids, score columns, splits, the very same tokenizer.json) and writes POOL/meta.json
(the shards in order, their meta.json hashes, the summed splits), a copy of the tokenizer and the shards' stats
summed; `dwm.data.dataset.PreparedData` reads such a pool as one data set."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from dwm.data.prepare_options import FORMAT, TMP_NAME
from dwm.errors import UserError


def _merge_stats(stats: list[dict]) -> dict:
    """Numbers summed key by key (nested dicts too); what is not a number in every shard is left out."""
    out: dict = {}
    for k in dict.fromkeys(k for s in stats for k in s):
        vals = [s[k] for s in stats if k in s]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = sum(vals)
        elif all(isinstance(v, dict) for v in vals):
            out[k] = _merge_stats(vals)
    return out


def make_pool(shard_dirs: list[str | Path], out: str | Path) -> dict:
    """`dwm prepare --pool --out OUT SHARD_DIR...`: OUT becomes one data set made of the prepared shard directories
    (read in the order given; nothing is copied but the tokenizer). Checks that the shards share seq_len, vocab,
    dtype, pad/eos ids, score columns and the very same tokenizer.json. Returns the pool's meta.json dict."""
    from dwm.data.dataset import POOL_FORMAT, check_shards_agree, file_sha256, read_meta

    out = Path(out)
    if not shard_dirs:
        raise UserError("--pool needs the prepared shard directories as inputs")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path exists and is not a directory: {out}")
    shards: list[tuple[Path, dict]] = []
    seen: dict[Path, str] = {}
    for raw in shard_dirs:
        sd = Path(raw)
        m = read_meta(sd)
        if m["format"] == POOL_FORMAT:
            raise UserError(f"{sd} is itself a pool: list its shards instead")
        if sd.resolve() in seen:
            raise UserError(f"{sd} is listed twice (also as {seen[sd.resolve()]})")
        if sd.resolve() == out.resolve():
            raise UserError(f"the pool {out} cannot be one of its shards")
        if not (sd / "tokenizer.json").is_file():
            raise UserError(f"{sd}: missing tokenizer.json")
        seen[sd.resolve()] = str(raw)
        shards.append((sd, m))
    check_shards_agree(shards, "dwm prepare --pool")
    tok_sha = [file_sha256(sd / "tokenizer.json") for sd, _ in shards]
    for (sd, _), h in zip(shards, tok_sha):
        if h != tok_sha[0]:
            raise UserError(f"{sd}/tokenizer.json differs from {shards[0][0]}/tokenizer.json: the shards' ids mean "
                            "different tokens (prepare every shard with the same --tokenizer)")
    splits = list(shards[0][1]["splits"])
    for sd, m in shards:
        if sorted(m["splits"]) != sorted(splits):
            raise UserError(f"{sd} has splits {sorted(m['splits'])} but {shards[0][0]} has {sorted(splits)}")
    if (out / "meta.json").is_file():
        try:
            old = json.loads((out / "meta.json").read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("format") == FORMAT:
            raise UserError(f"{out} is a prepared directory, not a pool: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    m0 = shards[0][1]
    packings = {m.get("packing") for _, m in shards}
    entries = [{"dir": os.path.relpath(sd.resolve(), out.resolve()), "meta_sha256": file_sha256(sd / "meta.json"),
                "splits": m["splits"]} for sd, m in shards]
    meta = {
        "format": POOL_FORMAT,
        **{k: m0[k] for k in ("seq_len", "vocab_size", "dtype", "pad_id", "eos_id")},
        "packing": packings.pop() if len(packings) == 1 else "mixed",
        "domains": sorted({d for _, m in shards for d in m["domains"]}),
        "sources": sorted({s for _, m in shards for s in m.get("sources", [])}),
        "score_columns": list(m0.get("score_columns", [])),
        "splits": {s: {k: sum(int(m["splits"][s].get(k, 0)) for _, m in shards) for k in ("n_samples", "n_docs")}
                   for s in splits},
        "tokenizer": {**(m0["tokenizer"] if isinstance(m0.get("tokenizer"), dict) else {}),
                      "sha256": tok_sha[0]},
        "shards": entries,
        "fingerprint": hashlib.sha256(json.dumps([e["meta_sha256"] for e in entries]).encode()).hexdigest(),
    }
    (out / "meta.json").unlink(missing_ok=True)  # from here on, OUT is not a finished pool
    tmp = out / TMP_NAME
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copyfile(shards[0][0] / "tokenizer.json", tmp / "tokenizer.json")
    stats = []
    for sd, _ in shards:
        try:
            stats.append(json.loads((sd / "stats.json").read_text()))
        except (OSError, ValueError):
            pass
    (tmp / "stats.json").write_text(json.dumps({**_merge_stats(stats), "shards": len(shards)}, indent=2) + "\n")
    for f in ("tokenizer.json", "stats.json"):
        os.replace(tmp / f, out / f)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp / "meta.json", out / "meta.json")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"dwm prepare: pool {out} of {len(shards)} shards: "
          + " / ".join(f"{s} {meta['splits'][s]['n_samples']:,}" for s in splits)
          + f" samples of {meta['seq_len']}, {len(meta['domains'])} domains")
    return meta
