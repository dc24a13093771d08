"""What the benchmark scripts share when they write a result: the commit it was measured at."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The repository's short HEAD commit ('' outside a git checkout)."""
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False,
                          capture_output=True, text=True).stdout.strip()
