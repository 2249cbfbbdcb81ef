"""Progress of long loops: a tqdm bar on a terminal, plain lines in logs.

Every long command (the engine's analyses, masking, single-class, the statistics) counts its
work in whole units (rows, image forwards, LDA fits, layers) through one ``Progress``:

- on creation, the work line ``"<desc>: <work>"`` (how much will be done, before starting), and
  ``"<desc>: resuming at <unit> N of M"`` when the count starts past zero (a resumed run);
- on a terminal, a tqdm bar with integer counts ("0/320", never "0.00/320"), rate and ETA;
- on anything else (a log file, a pipe, a notebook, pytest's capture), one plain line each time
  the count passes a tenth of the total, and at least every ``interval`` seconds while it moves:
  ``"masking: 1200/40800 image forwards (3%), 35.2/s, ETA 18 min 45 s"``; ``close()`` adds the
  final line (``done in ...`` or, when the loop stopped early, ``stopped at ...``).

Rates and ETAs count only the work of this process since it started (a resumed run's earlier
work took no time here). Pure Python and tqdm: no torch, Lightning or wandb.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

# Plain lines: at most one per tenth of the total, plus one per interval while work moves.
STEPS = 10
INTERVAL_S = 30.0


def duration(seconds: float) -> str:
    """A duration rounded for people.

    Args:
        seconds: the duration in s (negative counts as 0).

    Returns:
        "42 s", "18 min 45 s" or "2 h 05 min".
    """
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Count ``total`` units of work (module docstring); use as a context manager or close().

    Args:
        desc: what runs ("sobol", "masking").
        total: units of work in all.
        unit: the plural unit ("rows", "image forwards").
        work: the description printed first (default "<total> <unit>").
        initial: units already done (a resumed run).
        enabled: False prints nothing (the ``progress`` switch, and ranks other than zero).
        stream: where to print (default: sys.stderr at creation).
        interval: seconds between plain lines while work moves.
    """

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str,
        *,
        work: str | None = None,
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = INTERVAL_S,
    ) -> None:
        self.desc, self.unit = desc, unit
        self.total, self.initial, self.n = int(total), int(initial), int(initial)
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.started = self.last_line = time.perf_counter()
        self.last_step = self._step()
        self.closed = False
        self.bar: Any = None
        if not enabled:
            return
        self._print(f"{desc}: {work or f'{self.total} {unit}'}")
        if self.initial:
            self._print(f"{desc}: resuming at {_singular(unit)} {self.initial} of {self.total}")
        if _is_terminal(self.stream):
            from tqdm import tqdm

            # unit_scale off: integer counts ("0/320"); a leading space separates the rate's unit
            self.bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=f" {unit}",
                            dynamic_ncols=True, mininterval=1.0, file=self.stream)

    def update(self, n: int = 1) -> None:
        """Count work done, printing a line when due.

        Args:
            n: units done since the last update.
        """
        self.n += int(n)
        if self.bar is not None:
            self.bar.update(int(n))
            return
        if not self.enabled:
            return
        now, step = time.perf_counter(), self._step()
        if step > self.last_step or now - self.last_line >= self.interval:
            self.last_step, self.last_line = step, now
            if self.n < self.total:
                self._print(self.line(now))

    def note(self, text: str) -> None:
        """Print ``"<desc>: <text>"`` (an event of the loop, e.g. an adaptive run's decision),
        when enabled.

        Args:
            text: the event.
        """
        if self.enabled:
            self._print(f"{self.desc}: {text}")

    def line(self, now: float | None = None) -> str:
        """The plain progress line.

        Args:
            now: ``time.perf_counter()`` of the line (default: now).

        Returns:
            "<desc>: N/M <unit> (p%), r/s, ETA t"; "..., done in t" once the total is reached.
        """
        counts, elapsed, rate = self._counts(now)
        if self.n >= self.total:
            return f"{self.desc}: {counts}, done in {duration(elapsed)}"
        eta = duration((self.total - self.n) / rate) if rate > 0 else "unknown"
        return f"{self.desc}: {counts}, ETA {eta}"

    def close(self) -> None:
        """End the bar, or print the final plain line ("stopped at" before the total)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n >= self.total:
            self._print(self.line())
        elif self.enabled:
            counts, elapsed, _ = self._counts(None)
            self._print(f"{self.desc}: stopped at {counts} after {duration(elapsed)}")

    def _counts(self, now: float | None) -> tuple[str, float, float]:
        """("N/M <unit> (p%), r/s", seconds since creation, units per second since then)."""
        elapsed = (time.perf_counter() if now is None else now) - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        percent = 100 * self.n // self.total if self.total else 100
        speed = f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"  # slow loops: "0.031/s", not 0.0
        return f"{self.n}/{self.total} {self.unit} ({percent}%), {speed}/s", elapsed, rate

    def __enter__(self) -> Progress:
        """The progress itself."""
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        """``close()``."""
        self.close()

    def _step(self) -> int:
        """How many tenths of the total are done."""
        return STEPS * self.n // self.total if self.total else STEPS

    def _print(self, text: str) -> None:
        """One flushed line on the stream."""
        print(text, file=self.stream, flush=True)


def _singular(unit: str) -> str:
    """"rows" -> "row", "image forwards" -> "image forward" (for "resuming at row N")."""
    return unit[:-1] if unit.endswith("s") else unit


def _is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an open TTY."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
