"""Progress of long work, the same way everywhere: a tqdm bar when stderr is a terminal, otherwise an INFO line at
most every `LOG_EVERY_S` seconds (a log file or CI output gets a line, not a bar's carriage returns).

    with Progress(len(texts), "scoring", "text", logger=log) as progress:
        for batch in batches:
            ...
            progress.advance(len(batch))

`update(done, **fields)` sets the count instead, and shows fields beside it (loss, learning rate, samples/s).
A bar appears only for work that outlasts `BAR_DELAY_S`, so a one-text prediction draws nothing. While a bar is
drawn, the console's log lines are printed above it (tqdm's logging redirect) instead of through it.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import ExitStack
from types import TracebackType
from typing import Any

LOG_EVERY_S = 30.0  # without a terminal, progress is logged this often
BAR_DELAY_S = 2.0  # a terminal bar appears only for work that lasts longer than this

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """`1:02:03`, `2:03` or `5 s`: short and readable."""
    if not math.isfinite(seconds):
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}" if minutes else f"{secs} s"


def amount(value: float, unit: str) -> str:
    """A count in its unit; bytes in MB."""
    if unit == "B":
        return f"{value / 1e6:.1f} MB"
    return f"{int(value)}"


def field_text(name: str, value: Any) -> str:
    if isinstance(value, float):
        shown = f"{value:.2e}" if value and abs(value) < 1e-3 else f"{value:.4g}"
        return f"{name} {shown}"
    return f"{name} {value}"


class Progress:
    """Count `total` units of work (`initial` already done, as after a resume). A context manager; `close()` too."""

    def __init__(
        self,
        total: int | None,
        what: str,
        unit: str,
        *,
        logger: logging.Logger | None = None,
        initial: int = 0,
        enabled: bool = True,
    ) -> None:
        self.total, self.what, self.unit = total, what, unit
        self.logger = logger or log
        self.initial = self.done = initial
        self.fields: dict[str, Any] = {}
        self.start = self.last_line = time.perf_counter()
        self._bar: Any = None
        self._stack = ExitStack()
        if enabled and total and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = self._stack.enter_context(
                tqdm(
                    total=total,
                    initial=initial,
                    desc=what,
                    unit=unit,
                    unit_scale=unit == "B",
                    leave=False,
                    delay=BAR_DELAY_S,
                    dynamic_ncols=True,
                )
            )
            self._stack.enter_context(logging_redirect_tqdm())
        self.enabled = enabled and bool(total)

    def advance(self, n: int, **fields: Any) -> None:
        self.update(self.done + n, **fields)

    def update(self, done: int, **fields: Any) -> None:
        """Set the count to `done` and the fields shown beside it (None drops a field)."""
        if not self.enabled:
            return
        changed = {k: v for k, v in fields.items() if v is not None}
        self.fields.update(changed)
        if self._bar is not None:
            if changed:
                self._bar.set_postfix({k: field_text("", v).strip() for k, v in self.fields.items()}, refresh=False)
            self._bar.update(done - self.done)
            self.done = done
            return
        self.done = done
        now = time.perf_counter()
        if now - self.last_line >= LOG_EVERY_S:
            self.last_line = now
            self.logger.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """`training: 120 / 1000 steps (12%), loss 0.4123, lr 1.90e-04, 3.2 steps/s, ETA 4:35`."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.initial) / elapsed
        parts = [f"{self.what}: {amount(self.done, self.unit)}"]
        if self.total:
            share = 100 * self.done / self.total
            parts[0] += f" / {amount(self.total, self.unit)}" + ("" if self.unit == "B" else f" {self.unit}s")
            parts[0] += f" ({share:.0f}%)"
        parts += [field_text(k, v) for k, v in self.fields.items()]
        per_second = f"{rate / 1e6:.1f} MB/s" if self.unit == "B" else f"{rate:.3g} {self.unit}s/s"
        parts.append(per_second)
        if self.total and rate > 0:
            parts.append(f"ETA {duration((self.total - self.done) / rate)}")
        return ", ".join(parts)

    def close(self) -> None:
        self._stack.close()
        self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
