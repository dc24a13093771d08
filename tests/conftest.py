"""Shared fixtures: a synthetic prepared directory and tiny-model training configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test runs torch single-threaded (as its subprocesses do, OMP_NUM_THREADS=1: results compare bit for
    bit), set here once and restored at the end."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a TCP port the OS reports free on 127.0.0.1 (for DDP rendezvous; never a fixed number)."""
    import socket

    def _free() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return _free


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory):
    """64 train / 16 val rows of 32 tokens, two domains, a real 300-token BPE (built once per session)."""
    from dwm.testing import make_synthetic_prepared

    return make_synthetic_prepared(tmp_path_factory.mktemp("prepared") / "data")


TINY_OVERRIDES = ["model.spec=tiny", "train.global_batch_tokens=256", "train.micro_batch_size=4",
                  "train.max_steps=4", "log.every=1", "log.progress=false", "checkpoint.every=0",
                  "optim.warmup_steps=1", "train.device=cpu"]


@pytest.fixture
def make_cfg(prepared_dir, tmp_path):
    """make_cfg(*overrides, out=None) -> a RunConfig for the tiny model on the synthetic data (batch 8 x 32)."""
    from dwm.run import load_config

    def _make(*overrides: str, out=None):
        return load_config(None, [*TINY_OVERRIDES, f"data.dir={prepared_dir}", f"out={out or tmp_path / 'run'}",
                                  *overrides])

    return _make
