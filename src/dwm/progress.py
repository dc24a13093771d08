"""Progress of the long loops (BPE training, scoring in `dwm select`, lm-eval's requests, experiment cells): a tqdm
bar on a terminal, and otherwise (output going to a log file) one plain line every `interval` seconds, so a log
shows that a long command is alive and how far it got."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

LOG_INTERVAL_S = 30.0


class Progress:
    """`Progress(desc, total=None, unit="it")`: call `update(n, **postfix)` as work is done, `close()` at the end (or
    use it as a context manager). enabled=False prints nothing; None decides by whether the stream is a
    terminal (bar) or not (a line per interval)."""

    def __init__(self, desc: str, total: float | None = None, unit: str = "it", enabled: bool | None = None,
                 interval: float = LOG_INTERVAL_S, stream: TextIO | None = None):
        self.desc, self.total, self.unit, self.interval = desc, total, unit, interval
        self.stream = stream or sys.stderr
        self.n = 0.0
        self.postfix: dict[str, Any] = {}
        self.t0 = self._last = time.monotonic()
        self.enabled = enabled is not False
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        if self.enabled and tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: float = 1, **postfix: Any) -> None:
        self.n += n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: str(v) for k, v in postfix.items()}, refresh=False)
            return
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        done = f"{self.n:,.6g}" + (f"/{self.total:,.6g}" if self.total else "")
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {done} {self.unit}{extra}, {time.monotonic() - self.t0:.0f}s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
