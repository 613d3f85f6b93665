"""Rendering the report: tables as plain text, markdown and HTML; the report documents; the CSV.

Pure functions from `StudyData`, `Table`s and plot PNGs to strings; write.py puts them on disk.
The HTML report is self-contained: CSS inline, plots as base64 PNG data URIs, no scripts, no
network. Numeric columns are right-aligned, text columns left-aligned.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

from loralab.report.collect import StudyData, as_number, environment, run_implementation
from loralab.report.tables import (
    NOT_TRAINED,
    Table,
    cost_table,
    quality_tables,
    quant_tables,
    runs_table,
    unfinished_table,
)

PLOT_TITLES = {
    "trainable_params": "Trainable parameters per strategy",
    "loss_curves": "Training and validation loss",
    "peak_memory": "Peak memory",
    "train_time": "Training time",
    "pareto": "Quality vs trainable parameters (Pareto view)",
}

_NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?$", re.I)


# ----------------------------------------------------------------------------- tables
def text_table(t: Table) -> str:
    """A plain-text table for the terminal (best values marked with *)."""
    cells = [[c + ("*" if (i, j) in t.bold else "") for j, c in enumerate(row)]
             for i, row in enumerate(t.rows)]
    widths = [max(len(h), *(len(r[j]) for r in cells)) if cells else len(h)
              for j, h in enumerate(t.header)]
    line = "  ".join("-" * w for w in widths)
    out = [t.title, line, "  ".join(h.ljust(w) for h, w in zip(t.header, widths, strict=True)),
           line]
    out += ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in
                      enumerate(zip(r, widths, strict=False))) for r in cells]
    if t.note:
        out.append(t.note)
    return "\n".join(out)


def numeric_columns(t: Table) -> list[bool]:
    """Which columns hold numbers (right-aligned): every filled cell is a number, `mean ± std`
    or a dash for "none"; the first column (row names) never is."""
    out = []
    for j in range(len(t.header)):
        cells = [r[j].strip("*") for r in t.rows if j < len(r)]
        cells = [c for c in cells if c not in ("", "–", NOT_TRAINED)]
        out.append(j > 0 and bool(cells) and all(
            all(_NUMBER.match(part.strip()) for part in c.split("±")) for c in cells))
    return out


def md_table(t: Table) -> str:
    """A markdown table under a `###` title: best cells **bold**, published rows *italic*."""
    def cell(i: int, j: int, c: str) -> str:
        c = c.replace("|", "\\|")
        if (i, j) in t.bold:
            c = f"**{c}**"
        elif i in t.italic_rows and c != "–":
            c = f"*{c}*"
        return c
    lines = ["| " + " | ".join(t.header) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric_columns(t)) + "|"]
    lines += ["| " + " | ".join(cell(i, j, c) for j, c in enumerate(r)) + " |"
              for i, r in enumerate(t.rows)]
    text = f"### {t.title}\n\n" + "\n".join(lines)
    return text + (f"\n\n{t.note}" if t.note else "")


def html_table(t: Table) -> str:
    """An HTML table under an `<h3>` title: text columns get class "t" (left-aligned)."""
    attr = ["" if n else ' class="t"' for n in numeric_columns(t)]
    head = "".join(f"<th{attr[j]}>{html.escape(h)}</th>" for j, h in enumerate(t.header))
    body = []
    for i, r in enumerate(t.rows):
        cls = ' class="published"' if i in t.italic_rows else ""
        tds = "".join(f"<td{attr[j]}>"
                      f"{'<b>' + html.escape(c) + '</b>' if (i, j) in t.bold else html.escape(c)}"
                      "</td>" for j, c in enumerate(r))
        body.append(f"<tr{cls}>{tds}</tr>")
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return (f"<h3>{html.escape(t.title)}</h3>\n<div class=\"wide\"><table><thead><tr>{head}"
            "</tr></thead><tbody>" + "".join(body) + f"</tbody></table></div>{note}")


def terminal_report(data: StudyData) -> str:
    """The quality, cost and quantization tables (and unfinished runs) as plain text."""
    parts = [text_table(t) for t in quality_tables(data)] + [text_table(cost_table(data))]
    parts += [text_table(t) for t in quant_tables(data)]
    bad = unfinished_table(data)
    if bad is not None:
        parts.append(text_table(bad))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- documents
@dataclass(frozen=True)
class Sections:
    """Everything a report document shows, computed once for the markdown and HTML files."""

    quality: list[Table]
    cost: Table
    quant: list[Table]
    runs: Table
    summary: str
    description: str
    setup: str
    config_yaml: str
    env_json: str
    stamp: str


def _data_name(data: Any) -> str:
    return data.get("name", "?") if isinstance(data, dict) else str(data)


def sections(data: StudyData, stamp: str) -> Sections:
    """The tables and texts of a study's report; `stamp` is its generation time."""
    seeds = max((len(s.runs) for s in data.strategies), default=0)
    n_fin = sum(r["status"] == "finished" for r in data.rows)
    summary = (f"{n_fin} of {len(data.rows)} runs finished; {len(data.strategies)} strategies; "
               f"up to {seeds} seed(s) per strategy" + ("; cells show mean ± std over seeds"
                                                         if seeds > 1 else "")
               + ". Best measured value per column in bold.")
    setup = (f"model `{data.config.get('model', '?')}`, task `{data.config.get('task', '?')}`, "
             f"trained on `{_data_name(data.config.get('data'))}`, budget "
             f"`{json.dumps(data.config.get('budget', {}))}`")
    config_yaml = yaml.safe_dump(data.config, sort_keys=False, allow_unicode=True) \
        if data.config else "(no study config stored)\n"
    return Sections(quality_tables(data), cost_table(data), quant_tables(data), runs_table(data),
                    summary, str(data.config.get("description") or "").strip(), setup,
                    config_yaml, json.dumps(environment(data), indent=2, default=str), stamp)


def markdown_report(name: str, sec: Sections, plot_keys: list[str], plots_dir: str) -> str:
    """report.md: tables, plots linked from `plots_dir`, the study config and environment."""
    md = [f"# loralab study: {name}", "", f"_Generated {sec.stamp} from the results database._",
          ""]
    if sec.description:
        md += [sec.description, ""]
    md += [sec.setup + ".", "", sec.summary, "", "## Quality", ""]
    md += [md_table(t) + "\n" for t in sec.quality] or ["(no finished runs with metrics)\n"]
    md += ["## Cost", "", md_table(sec.cost), ""]
    if sec.quant:
        md += ["## Quantization", ""] + [md_table(t) + "\n" for t in sec.quant]
    md += ["## Plots", ""]
    md += [f"![{PLOT_TITLES[k]}]({plots_dir}/{k}.png)\n" for k in plot_keys]
    md += ["## Runs", "", md_table(sec.runs), "", "## Study configuration", "", "```yaml",
           sec.config_yaml.rstrip(), "```", "", "## Environment", "", "```json",
           sec.env_json, "```", ""]
    return "\n".join(md)


def _code_html(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def html_report(name: str, sec: Sections, plots: dict[str, bytes]) -> str:
    """report.html, self-contained: inline CSS, plots as base64 PNG data URIs, no scripts."""
    imgs = "".join(
        f'<figure><img alt="{html.escape(PLOT_TITLES[k])}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(PLOT_TITLES[k])}'
        "</figcaption></figure>" for k, png in plots.items())
    body = [f"<h1>loralab study: {html.escape(name)}</h1>",
            f'<p class="note">Generated {sec.stamp} from the results database.</p>']
    if sec.description:
        body.append(f"<p>{html.escape(sec.description)}</p>")
    body += [f"<p>{_code_html(sec.setup)}.</p>", f"<p>{html.escape(sec.summary)}</p>",
             "<h2>Quality</h2>"]
    body += [html_table(t) for t in sec.quality] or ["<p>(no finished runs with metrics)</p>"]
    body += ["<h2>Cost</h2>", html_table(sec.cost)]
    if sec.quant:
        body += ["<h2>Quantization</h2>"] + [html_table(t) for t in sec.quant]
    body += ["<h2>Plots</h2>", imgs, "<h2>Runs</h2>",
             html_table(sec.runs), "<h2>Study configuration</h2>",
             f"<pre>{html.escape(sec.config_yaml)}</pre>", "<h2>Environment</h2>",
             f"<pre>{html.escape(sec.env_json)}</pre>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>loralab study: {html.escape(name)}</title><style>{_CSS}</style></head>"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------- csv
def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A run's "quant" section as flat CSV columns: nested keys joined by "/" (e.g.
    `latency/merged/median_ms`, `merge_metric_drift/<eval set>/f1`); numbers and the scheme
    name only (paths and notes stay in the run record)."""
    out: dict[str, Any] = {}
    if not isinstance(obj, dict):
        return out
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif as_number(v) is not None or key == "scheme":
            out[key] = v
    return out


def _first_seen(keys: list[list[str]]) -> list[str]:
    out: list[str] = []
    for row_keys in keys:
        out += [k for k in row_keys if k not in out]
    return out


def _csv_row(r: dict[str, Any], header: list[str]) -> dict[str, Any]:
    cfg = (r.get("config") or {}).get("study") or {}
    row = {"study": r["study"], "strategy": r["strategy"], "method": cfg.get("method", ""),
           "seed": r["seed"], "status": r["status"], "run_id": r["run_id"],
           # what the run computed in (auto resolved); runs from before auto: their config's
           "precision": (r.get("env") or {}).get("precision")
           or ((r.get("config") or {}).get("train") or {}).get("precision") or "",
           "implementation": run_implementation(r),
           "run_dir": r.get("run_dir") or "", "error": r.get("error") or ""}
    for e, ms in (r.get("metrics") or {}).items():
        for m, v in (ms or {}).items() if isinstance(ms, dict) else ():
            if f"{e}/{m}" in header:
                row[f"{e}/{m}"] = v
    for k, v in (r.get("costs") or {}).items():
        row[f"cost/{k}"] = v
    for k, v in flatten(r.get("quant")).items():
        row[f"quant/{k}"] = v
    arts = r.get("artifacts") or {}
    row["adapter"], row["model"] = arts.get("adapter") or "", arts.get("model") or ""
    return row


def csv_rows(data: StudyData) -> tuple[list[str], list[dict[str, Any]]]:
    """(header, one dict per run) of results.csv: every run, finished or not, whose
    implementation ("loralab", "PEFT LoRA", ...: `collect.run_implementation`), every
    metric (`<eval set>/<metric>`), cost (`cost/<key>`) and quantization number
    (`quant/<key path>`) it recorded."""
    metric_cols = _first_seen([
        [f"{e}/{m}" for e, ms in (r.get("metrics") or {}).items()
         for m in (ms if isinstance(ms, dict) else {})] for r in data.rows])
    cost_keys = _first_seen([list(r.get("costs") or {}) for r in data.rows])
    quant_keys = _first_seen([list(flatten(r.get("quant"))) for r in data.rows])
    header = (["study", "strategy", "method", "seed", "status", "run_id", "precision",
               "implementation"] + metric_cols
              + [f"cost/{k}" for k in cost_keys] + [f"quant/{k}" for k in quant_keys]
              + ["run_dir", "adapter", "model", "error"])
    return header, [_csv_row(r, header) for r in data.rows]


def csv_text(data: StudyData) -> str:
    """results.csv as text (`csv_rows`)."""
    header, rows = csv_rows(data)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child,th.t,td.t{text-align:left}
td:not(.t){white-space:nowrap}
thead th{background:#f3f3f3}
tr.published td{font-style:italic;color:#555;background:#fafaf0}
.note{color:#666;font-size:.88em}
.wide{overflow-x:auto}
figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
code{background:#f3f3f3;padding:0 .2em}
"""
