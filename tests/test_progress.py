"""loralab.progress: a tqdm bar on a terminal, plain lines with elapsed time elsewhere."""

from __future__ import annotations

import io
import re

from loralab.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_about_every_tenth_and_at_the_end():
    out = io.StringIO()  # not a terminal: a log file, CI, a pipe
    with Progress("final evaluation, test", 25, stream=out) as shown:
        for _ in range(25):
            shown.update()
    lines = out.getvalue().splitlines()
    # ceil(25 / 10) = 3: lines after 3, 6, ..., 24 batches, then the closing one
    assert [int(re.search(r": (\d+)/25", s).group(1)) for s in lines] == [*range(3, 25, 3), 25]
    assert all(re.search(r"\d\d:\d\d:\d\d elapsed$", s) for s in lines[:-1])
    assert re.fullmatch(r"final evaluation, test: 25/25 batches in \d+\.\d s", lines[-1])


def test_a_terminal_gets_a_bar_and_a_disabled_one_prints_nothing():
    term = _Terminal()
    shown = Progress("final evaluation, validation", 4, stream=term)
    assert shown.bar is not None
    for _ in range(4):
        shown.update()
    assert shown.close() >= 0
    assert "4/4" in term.getvalue() and "batches in" in term.getvalue()
    quiet = io.StringIO()
    off = Progress("x", 4, stream=quiet, enabled=False)
    off.update(4)
    off.close()
    assert quiet.getvalue() == "" and off.done == 4
