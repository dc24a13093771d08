"""Atomic checkpoints, retention and resume.

A checkpoint is written into a hidden temp directory and renamed into place, then `LATEST` is replaced atomically,
so a run killed at any instant leaves either the previous or the new checkpoint complete, never a half-written one
that `--resume` would trust. Resume still verifies what it loads (a disk can lose files): a damaged newest
checkpoint is skipped with a warning when an older good one exists; otherwise the run stops with a clear error.
A temp directory left by a save that was killed is removed when the next run starts (`remove_stale_tmp`); a save
that fails (a full disk) removes its own and reports the path and the bytes it needed in one line.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dwm.errors import UserError, disk_full

_NAME = re.compile(r"^step_(\d{8})$")


def ckpt_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def checkpoint_bytes(model: torch.nn.Module, state: dict[str, Any]) -> int:
    """About the bytes a checkpoint takes: the model's tensors plus every tensor in the trainer state (the
    optimizer's moments dominate); python objects (RNG states, config) add a few kB."""
    def tensors(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensors(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensors(v) for v in obj)
        return 0

    return tensors(dict(model.state_dict())) + tensors(state) + 64 * 1024


def remove_stale_tmp(ckpt_root: Path) -> list[str]:
    """Remove the temp directories / LATEST temp files a killed save left behind; returns their names."""
    if not ckpt_root.is_dir():
        return []
    gone = []
    for p in sorted(ckpt_root.iterdir()):
        if p.name.startswith((".tmp_", ".LATEST.")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    keep_last: int = 2, keep_every: int = 0) -> Path:
    """Write checkpoints/step_XXXXXXXX/{model/, trainer_state.pt} atomically, update LATEST, apply retention.
    A full disk is a UserError naming the path and the bytes needed; the partial temp directory is removed and
    the previous checkpoint (and LATEST) stay as they were."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / ckpt_name(step)
    tmp = ckpt_root / f".tmp_{ckpt_name(step)}_{os.getpid()}"
    latest_tmp = ckpt_root / f".LATEST.{os.getpid()}"
    try:
        _write_checkpoint(tmp, final, latest_tmp, ckpt_root, model, state)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        latest_tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(f"checkpoint {final}", checkpoint_bytes(model, state), ckpt_root,
                            "the previous checkpoint is kept; free space, then --resume") from None
        raise
    apply_retention(ckpt_root, keep_last, keep_every)
    return final


def _write_checkpoint(tmp: Path, final: Path, latest_tmp: Path, ckpt_root: Path, model: torch.nn.Module,
                      state: dict[str, Any]) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of ours
    model.save_pretrained(tmp / "model", safe_serialization=True)
    with open(tmp / "trainer_state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, ckpt_root / "LATEST")
    _fsync_dir(ckpt_root)


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step_* directory, newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def apply_retention(ckpt_root: Path, keep_last: int, keep_every: int = 0) -> None:
    """Keep the newest `keep_last` checkpoints plus those at multiples of `keep_every`."""
    for i, (step, path) in enumerate(list_checkpoints(ckpt_root)):
        if i < keep_last or (keep_every and step % keep_every == 0):
            continue
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, trainer state) of one checkpoint; raises ValueError when incomplete or unreadable."""
    weights = path / "model" / "model.safetensors"
    if not (path / "model" / "config.json").is_file() or not weights.is_file():
        raise ValueError("model/config.json or model/model.safetensors missing")
    if not (path / "trainer_state.pt").is_file():
        raise ValueError("trainer_state.pt missing")
    try:
        model_sd = load_file(str(weights))
    except Exception as e:
        raise ValueError(f"model weights unreadable ({e})") from e
    try:
        # our own file, written by save_checkpoint: it holds numpy/python RNG states, so not weights_only
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"trainer_state.pt unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError("trainer_state.pt has no step")
    return model_sd, state


def load_latest(ckpt_root: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """The newest good checkpoint (LATEST first, then older ones); UserError when there is none."""
    found = list_checkpoints(ckpt_root)
    if not found:
        raise UserError(f"--resume: no checkpoint in {ckpt_root}")
    order = [p for _, p in found]
    latest_file = ckpt_root / "LATEST"
    if latest_file.is_file():
        name = latest_file.read_text().strip()
        preferred = ckpt_root / name
        if preferred in order:
            order.remove(preferred)
            order.insert(0, preferred)
    errors = []
    for path in order:
        try:
            model_sd, state = load_checkpoint(path)
        except ValueError as e:
            errors.append(f"{path.name}: {e}")
            continue
        if errors:
            warnings.warn(f"skipping damaged checkpoint(s) {'; '.join(errors)}; resuming from {path.name}",
                          stacklevel=2)
        return path, model_sd, state
    raise UserError(f"--resume: no usable checkpoint in {ckpt_root} ({'; '.join(errors)})")
