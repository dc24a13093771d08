"""Files of a run directory read back by the parts that did not write them (evaluation, analysis, benchmarks).

RUN_DIR/metrics.jsonl: one JSON object per line, appended by the trainer (rank 0). Outside `dwm.train`, so that
analysis, which reads run directories and not the code that wrote them, can use it too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every record of a metrics.jsonl file, in order. A line that is not a JSON object (blank, or the torn last
    line of a killed run) is skipped; a missing file has no records."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec
