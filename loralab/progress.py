"""Progress of a long counted loop on stderr (the final evaluation of `loralab train`).

On a terminal a tqdm bar; otherwise (logs, CI, pipes) a plain line at about every tenth of the
work and one at the end, each with the elapsed time, so a log shows the loop is alive without
a line per item. Nothing is printed when disabled (processes other than rank 0).
"""

from __future__ import annotations

import sys
import time
from typing import Self, TextIO


class Progress:
    """`update(n)` after each item; `close()` returns the seconds spent."""

    def __init__(self, label: str, total: int, unit: str = "batch", units: str = "batches", *,
                 enabled: bool = True, stream: TextIO | None = None, lines: int = 10) -> None:
        self.label, self.total, self.unit, self.units = label, max(0, int(total)), unit, units
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.t0 = time.perf_counter()
        self.every = max(1, -(-self.total // max(1, lines)))  # ceil(total / lines)
        self.bar = None
        if enabled and self.stream.isatty() and self.total > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=label, unit=unit, file=self.stream,
                            dynamic_ncols=True, leave=True)

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        elif self.done < self.total and self.done % self.every == 0:
            spent = time.perf_counter() - self.t0
            self._line(f"{self.label}: {self.done}/{self.total} {self.units}, "
                       f"{time.strftime('%H:%M:%S', time.gmtime(spent))} elapsed")

    def close(self) -> float:
        spent = time.perf_counter() - self.t0
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self._line(f"{self.label}: {self.done}/{self.total} {self.units} in {spent:.1f} s")
        return spent

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
