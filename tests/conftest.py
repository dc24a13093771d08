"""Shared fixtures: a synthetic prepared directory and tiny-model training configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
    from dwm.train.config import load_config

    def _make(*overrides: str, out=None):
        return load_config(None, [*TINY_OVERRIDES, f"data.dir={prepared_dir}", f"out={out or tmp_path / 'run'}",
                                  *overrides])

    return _make
