"""progress: a one-line transfer progress bar on stderr for the CLI.

What it knows: byte counts, a label, a text stream and a clock. What it must not know: stores,
crypto, trio. It draws only when the stream is a terminal and the transfer is large (over
``MIN_BYTES``), so piped or scripted use stays quiet (a successful command prints nothing to
stderr). The label is shown only on the terminal the user is looking at, never logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

MIN_BYTES = 4 * 1024 * 1024
_REDRAW_S = 0.1
_WIDTH = 30


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Counts bytes and redraws ``label [####    ] 12.0/50.0 MiB 80.1 MiB/s`` at most 10 times/s.

    Use as a context manager; ``update(n)`` may be called from any thread-free code path (the
    CLI calls it from the trio loop). ``close()`` ends the line.
    """

    def __init__(
        self,
        total: int | None,
        label: str,
        stream: TextIO,
        *,
        min_bytes: int = MIN_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.label = label
        self.stream = stream
        self.done = 0
        self._clock = clock
        self._start = clock()
        self._last_draw = 0.0
        isatty = getattr(stream, "isatty", None)
        tty = bool(isatty()) if callable(isatty) else False
        self.enabled = tty and (total is None or total > min_bytes)
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int) -> None:
        """Add ``n`` transferred bytes and redraw if it is time."""
        self.done += n
        if not self.enabled:
            return
        now = self._clock()
        if now - self._last_draw >= _REDRAW_S:
            self._last_draw = now
            self._draw(now)

    def close(self) -> None:
        """Draw the final state and end the line (only if anything was drawn)."""
        if self.enabled and self._drawn:
            self._draw(self._clock())
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
        self.enabled = False

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = _human(self.done / elapsed) + "/s"
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * _WIDTH)
            text = f"{self.label} [{bar:<{_WIDTH}}] {_human(self.done)}/{_human(self.total)} {rate}"
        else:
            text = f"{self.label} {_human(self.done)} {rate}"
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._drawn = True
