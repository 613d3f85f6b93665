"""Writing a study's report files from its results database alone.

report.md, report.html, results.csv and plots/*.png, each written atomically (a temporary
file renamed over the old one), so a reader never sees half a report. The report reads the
run records in the database; it never writes a run record.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from loralab.report.collect import StudyData, load
from loralab.report.plots import make_plots
from loralab.report.render import csv_text, html_report, markdown_report, sections


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` through a temporary sibling and `os.replace`."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def write_study(data: StudyData, out_dir: Path, suffix: str = "") -> list[Path]:
    """Write one study's report files into `out_dir` (names end in `suffix`: "" or
    "-<study>"). Returns [report.md, report.html, results.csv, plots...]."""
    plots_dir = out_dir / f"plots{suffix}"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = make_plots(data)
    written = []
    for key, png in plots.items():
        p = plots_dir / f"{key}.png"
        atomic_write(p, png)
        written.append(p)
    sec = sections(data, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    md_path = out_dir / f"report{suffix}.md"
    atomic_write(md_path, markdown_report(data.name, sec, list(plots), f"plots{suffix}"))
    html_path = out_dir / f"report{suffix}.html"
    atomic_write(html_path, html_report(data.name, sec, plots))
    csv_path = out_dir / f"results{suffix}.csv"
    atomic_write(csv_path, csv_text(data))
    return [md_path, html_path, csv_path] + written


def write_report(out_dir: str | Path, *, study: str | None = None,
                 db_path: str | Path | None = None) -> list[Path]:
    """Rebuild the report(s) of `out_dir` from its results database alone.

    Writes report.md, report.html, results.csv and plots/*.png (one set per study; with several
    studies in one database the files get a `-<study>` suffix). `db_path` defaults to the
    database in `out_dir`. Returns the written paths. Raises UserError when the database holds
    no runs or not `study`."""
    out_dir = Path(out_dir)
    studies = load(db_path or out_dir, study)
    written = []
    for data in studies:
        suffix = "" if len(studies) == 1 else f"-{data.name}"
        written += write_study(data, out_dir, suffix)
    return written
