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


@pytest.fixture(autouse=True)
def one_thread_after_each_test():
    """A test that changes torch's thread count (`dwm demo` sets it for each arm it trains in-process) leaves the
    next test single-threaded again: two threads on busy shared cores make later tests many times slower."""
    yield
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


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
    """64 train / 16 val rows of 32 tokens, two domains, a real 300-token BPE (built once per test run)."""
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


def dwm_modules() -> list[str]:
    """Every module of the dwm package, dotted (dwm, dwm.cli, dwm.data.batch, ...), from the source tree."""
    from pathlib import Path

    import dwm

    root = Path(dwm.__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def pytest_sessionfinish(session):
    """With DWM_FAST_COVERAGE=1 (`make test-fast`): fail the run if a dwm module was never imported in this process,
    i.e. no test of the selected tier exercised it (modules only subprocesses import do not count)."""
    import sys

    if os.environ.get("DWM_FAST_COVERAGE") != "1":
        return
    missing = [m for m in dwm_modules() if m not in sys.modules]
    if missing:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write("\n")
        reporter.write_line(f"dwm modules no test of this run imports ({len(missing)}): {', '.join(missing)}", red=True)
        session.exitstatus = 1
