"""The report: from the results database alone to report.md, report.html, results.csv and plots.

Nothing here knows which metrics exist: quality columns are whatever the run records hold, per
evaluation set. The only metric knowledge is the direction (lower is better for names like
loss, perplexity, TER), used to mark the best value in bold. Published numbers from the study
file (`published:`) are extra rows labelled "published", never compared for "best".

With several seeds a cell is `mean ± std` (sample standard deviation, n-1) over the seeds.
The HTML report is self-contained: CSS inline, plots as base64 PNG data URIs, no scripts, no
network. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loralab.errors import UserError
from loralab.results.database import ResultsDB, find_db

# Metric-name tokens meaning "lower is better" (everything else: higher is better).
_LOWER_TOKENS = {"loss", "perplexity", "ppl", "nll", "ter", "wer", "cer", "bpc", "bpb", "error",
                 "seconds", "time"}
# (cost key, column title, unit scale, format)
COST_COLUMNS = (
    ("trainable_params", "trainable params", 1, "int"),
    ("trainable_pct", "% of total", 1, "pct"),
    ("artifact_bytes", "adapter/model MB", 1e-6, "num"),
    ("data_seconds", "data prep (s)", 1, "num"),
    ("train_seconds", "train time (s)", 1, "num"),
    ("tokens_per_second", "tokens/s", 1, "num"),
    ("peak_memory_bytes", "peak memory (MB)", 1e-6, "num"),
)


# Training costs an untuned row (method none) has no business reporting: it trains nothing, so
# its train time, throughput and sampled peak memory are noise. Shown as NOT_TRAINED.
TRAINING_COSTS = ("artifact_bytes", "train_seconds", "tokens_per_second", "peak_memory_bytes")
NOT_TRAINED = "—"
QUANT_METHODS = ("qat-lora", "qlora", "lora-ptq")

# Bookkeeping numbers in a metrics dict that are not quality (how many targets were scored).
COUNT_KEYS = ("targets", "examples", "num_examples", "generated")


def lower_is_better(metric: str) -> bool:
    tokens = set(re.split(r"[^a-z]+", metric.lower()))
    return bool(tokens & _LOWER_TOKENS) or "loss" in metric.lower() or "perplexity" in metric.lower()


# ----------------------------------------------------------------------------- aggregation
@dataclass
class Stat:
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class StrategyResult:
    name: str
    method: str | None
    runs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, dict[str, Stat]] = field(default_factory=dict)  # eval set -> metric -> Stat
    costs: dict[str, Stat] = field(default_factory=dict)


@dataclass
class StudyData:
    name: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    strategies: list[StrategyResult]
    eval_sets: list[str]
    metrics: dict[str, list[str]]  # eval set -> metric names in first-seen order

    @property
    def published(self) -> dict[str, Any] | None:
        return self.config.get("published")


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def collect(rows: list[dict[str, Any]], name: str, config: dict[str, Any] | None = None
            ) -> StudyData:
    """Group finished run rows by strategy (in the study's order) and aggregate over seeds."""
    config = config or {}
    order = [s.get("name") for s in config.get("strategies", []) if isinstance(s, dict)]
    methods = {s.get("name"): s.get("method") for s in config.get("strategies", [])
               if isinstance(s, dict)}
    by_name: dict[str, StrategyResult] = {}
    eval_sets: list[str] = [e if isinstance(e, str) else e.get("name") for e in
                            config.get("eval", []) if e]
    metric_names: dict[str, list[str]] = {}
    for row in rows:
        if row.get("status") != "finished":
            continue
        res = by_name.setdefault(row["strategy"], StrategyResult(
            row["strategy"], methods.get(row["strategy"])
            or ((row.get("config") or {}).get("study") or {}).get("method")))
        res.runs.append(row)
        for set_name, metrics in (row.get("metrics") or {}).items():
            if not isinstance(metrics, dict):
                continue
            if set_name not in eval_sets:
                eval_sets.append(set_name)
            names = metric_names.setdefault(set_name, [])
            for metric, value in metrics.items():
                v = _num(value)
                if v is None:
                    continue
                if metric not in names:
                    names.append(metric)
                res.metrics.setdefault(set_name, {}).setdefault(metric, Stat([])).values.append(v)
        for key, value in (row.get("costs") or {}).items():
            v = _num(value)
            if v is not None:
                res.costs.setdefault(key, Stat([])).values.append(v)
    ordered = [by_name[n] for n in order if n in by_name]
    ordered += [r for n, r in by_name.items() if n not in order]
    configured = [e for e in eval_sets if e in metric_names and e in
                  [x if isinstance(x, str) else x.get("name") for x in config.get("eval", [])]]
    # The study's eval sets when it names them (the CSV keeps every split the runs recorded).
    eval_sets = configured or [e for e in eval_sets if e in metric_names]
    for names in metric_names.values():
        names[:] = [m for m in names if m not in COUNT_KEYS]
    return StudyData(name=name, config=config, rows=rows, strategies=ordered,
                     eval_sets=eval_sets, metrics=metric_names)


def load(db_path: str | Path, study: str | None = None) -> list[StudyData]:
    """Every study in the database (or just `study`) with its finished runs aggregated."""
    with ResultsDB(find_db(db_path)) as db:
        studies = {s["name"]: s["config"] for s in db.studies()}
        rows = db.list_runs()
    names = list(studies) + sorted({r["study"] for r in rows} - set(studies))
    if study is not None:
        if study not in names:
            raise UserError(f"no study '{study}' in {db_path}; studies there: "
                            f"{', '.join(names) or 'none'}")
        names = [study]
    if not names:
        raise UserError(f"the results database in {db_path} holds no runs; run `loralab "
                        "compare` first")
    return [collect([r for r in rows if r["study"] == n], n, studies.get(n)) for n in names]


# ----------------------------------------------------------------------------- formatting
def fmt_value(x: float, kind: str = "num") -> str:
    if kind == "int":
        return f"{int(round(x)):,}"
    if kind == "pct":
        return f"{x:.3g}%" if x < 100 else f"{x:.0f}%"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3e}"
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"


def fmt_stat(stat: Stat | None, kind: str = "num") -> str:
    if stat is None:
        return "–"
    text = fmt_value(stat.mean, kind)
    if stat.n > 1 and stat.std != 0:
        text += f" ± {fmt_value(stat.std, 'num' if kind == 'int' else kind)}"
    return text


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, col) cells in bold
    italic_rows: set[int] = field(default_factory=set)       # published rows
    note: str = ""


def quality_tables(data: StudyData) -> list[Table]:
    """One table per eval set: rows = strategies (+ published rows), columns = its metrics."""
    tables = []
    published = data.published or {}
    for set_name in data.eval_sets:
        metrics = list(data.metrics.get(set_name, []))
        pub_rows = [r for r in published.get("rows", []) if set_name in (r.get("metrics") or {})]
        for r in pub_rows:
            for m in r["metrics"][set_name]:
                if m not in metrics:
                    metrics.append(m)
        header = ["strategy", "seeds"] + metrics
        rows, bold = [], set()
        for col, metric in enumerate(metrics, start=2):
            means = [(i, s.metrics.get(set_name, {}).get(metric)) for i, s in
                     enumerate(data.strategies)]
            means = [(i, st.mean) for i, st in means if st is not None]
            if len(means) > 1:
                pick = min if lower_is_better(metric) else max
                best = pick(v for _, v in means)
                bold |= {(i, col) for i, v in means if v == best}
        for s in data.strategies:
            cells = [s.name, str(len(s.runs))]
            cells += [fmt_stat(s.metrics.get(set_name, {}).get(m)) for m in metrics]
            rows.append(cells)
        italic = set()
        for r in pub_rows:
            italic.add(len(rows))
            vals = r["metrics"][set_name]
            rows.append([f"{r['name']} (published)", "–"]
                        + [fmt_value(float(vals[m])) if _num(vals.get(m)) is not None else "–"
                           for m in metrics])
        note = ""
        if pub_rows:
            note = ("Rows marked (published) are numbers reported in "
                    f"{published.get('source', 'the literature')}, not measured here"
                    + (f"; {published['note']}" if published.get("note") else "") + ".")
        tables.append(Table(f"Quality on {set_name}", header, rows, bold, italic, note))
    return tables


def cost_table(data: StudyData) -> Table:
    header = ["strategy", "method"] + [title for _, title, _, _ in COST_COLUMNS]
    rows = []
    for s in data.strategies:
        cells = [s.name, s.method or "–"]
        for key, _, scale, kind in COST_COLUMNS:
            if s.method == "none" and key in TRAINING_COSTS:
                cells.append(NOT_TRAINED)
                continue
            st = s.costs.get(key)
            cells.append(fmt_stat(Stat([v * scale for v in st.values]) if st else None, kind))
        rows.append(cells)
    published = data.published or {}
    italic = set()
    for r in published.get("rows", []):
        if r.get("params") is not None:
            italic.add(len(rows))
            rows.append([f"{r['name']} (published)", "–", fmt_value(float(r["params"]), "int")]
                        + ["–"] * (len(COST_COLUMNS) - 1))
    return Table("Cost per strategy", header, rows, set(), italic,
                 _run_time_note(data) +
                 "Peak memory is the growth of the process's resident memory during training (see the "
                 "run records for tensor-level peaks); adapter/model MB is the size on disk of "
                 f"what the run saved. {NOT_TRAINED} = not trained (the untuned model): no "
                 "training cost to measure.")


RUN_TIME_PARTS = (("load_seconds", "model loading"), ("data_seconds", "data preparation"),
                  ("train_seconds", "training"), ("eval_seconds", "evaluation"),
                  ("generation_seconds", "generation"))


def _run_time_note(data: StudyData) -> str:
    """The study's run time, summed over its runs and split by phase, so a reader sees what a
    rerun costs and that data preparation (tokenised sets are cached) does not dominate."""
    parts = {key: sum(sum(s.costs[key].values) for s in data.strategies if s.costs.get(key))
             for key, _ in RUN_TIME_PARTS}
    total = sum(parts.values())
    if total <= 0:
        return ""
    split = ", ".join(f"{label} {parts[key]:.0f} s" for key, label in RUN_TIME_PARTS
                      if parts[key] > 0)
    return (f"Run time of the whole study: {total:.0f} s ({total / 60:.1f} min), summed over its "
            f"runs: {split}. ")


def _dig(obj: Any, *path: str) -> float | None:
    """obj[path[0]][path[1]]... as a number, None when any step is missing."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return _num(obj)


def _quant_stat(s: StrategyResult, *path: str, scale: float = 1.0) -> Stat | None:
    """A number of the runs' "quant" sections aggregated over seeds (None if no run has it)."""
    values = [v * scale for r in s.runs if (v := _dig(r.get("quant"), *path)) is not None]
    return Stat(values) if values else None


def quant_strategies(data: StudyData) -> list[StrategyResult]:
    """Strategies whose finished runs carry a quantization section (qat-lora, qlora, lora-ptq)."""
    return [s for s in data.strategies if any(isinstance(r.get("quant"), dict) for r in s.runs)]


def _quant_metrics(data: StudyData) -> list[tuple[str, str]]:
    """(eval set, metric) pairs the quantization tables show: each eval set's primary metric,
    plus accuracy when that is not the primary one."""
    out = []
    for e in data.eval_sets:
        prim = _primary_metric(data, e)
        for m in (prim, "accuracy"):
            if m and m in data.metrics.get(e, []) and (e, m) not in out:
                out.append((e, m))
    return out


def _scheme(s: StrategyResult) -> str:
    names = sorted({str(r["quant"].get("scheme")) for r in s.runs if isinstance(r.get("quant"),
                                                                                  dict)})
    return ", ".join(names) or "–"


def quant_table(data: StudyData) -> Table | None:
    """Quantized strategies: sizes, latency and the drift of merging the adapter into the
    quantized model (merged Q(W + s B A) vs unmerged Q(W) + s B A), from each run's "quant"
    section as quant.py measured it. None when no run has one."""
    qs = quant_strategies(data)
    if not qs:
        return None
    pairs = _quant_metrics(data)
    header = ["strategy", "method", "scheme", "float MB (fp32 weights)", "quantized MB (disk)",
              "latency unmerged (ms)", "latency merged (ms)", "logit drift (max abs)",
              "logit drift mean KL", "top-1 agreement"]
    header += [f"Δ {m} merged−unmerged ({e})" for e, m in pairs]
    rows = []
    for s in qs:
        rows.append([s.name, s.method or "–", _scheme(s)] + [fmt_stat(st) for st in (
            _quant_stat(s, "float_weight_bytes", scale=1e-6),
            _quant_stat(s, "quantized_model_bytes", scale=1e-6),
            _quant_stat(s, "latency", "unmerged", "median_ms"),
            _quant_stat(s, "latency", "merged", "median_ms"),
            _quant_stat(s, "merge_logit_drift", "max_abs"),
            _quant_stat(s, "merge_logit_drift", "mean_kl"),
            _quant_stat(s, "merge_logit_drift", "top1_agreement"),
            *(_quant_stat(s, "merge_metric_drift", e, m) for e, m in pairs))])
    return Table("Quantization: size, latency and merge drift", header, rows, set(), set(),
                 "Float MB = 4 bytes x logical parameters; quantized MB = the merged quantized "
                 "model as saved (quantized/model.pt, torch.save state dict). Latency: median "
                 "forward pass over one validation batch, merged and unmerged timed "
                 "interleaved in the same run. Merge drift compares the deployed merged model "
                 "Q(W + s B A) with the unmerged Q(W) + s B A (logits on up to 4 validation "
                 "batches; Δ metric = merged − unmerged on the eval set).")


def deploy_table(data: StudyData) -> Table | None:
    """The deployment comparison: quality, size on disk and latency of the float LoRA model
    (merged fp32, measured in lora-ptq runs), its post-training quantization, QAT-LoRA and the
    QLoRA model merged into its quantized base, side by side. None without quantized runs."""
    qs = quant_strategies(data)
    if not qs:
        return None
    pairs = _quant_metrics(data)
    header = ["deployed model", "strategy", "scheme"] + [f"{m} ({e})" for e, m in pairs] + [
        "model MB (disk)", "latency (ms)"]
    rows: list[list[str]] = []
    stats: list[list[Stat | None]] = []

    def add(label: str, s: StrategyResult, scheme: str, quality: list[Stat | None],
            size: Stat | None, lat: Stat | None) -> None:
        rows.append([label, s.name, scheme] + [fmt_stat(q) for q in quality]
                    + [fmt_stat(size), fmt_stat(lat)])
        stats.append(quality + [size, lat])

    run_metric = lambda s, e, m: s.metrics.get(e, {}).get(m)  # noqa: E731
    for s in qs:
        if s.method == "lora-ptq":
            add("float + LoRA (merged, fp32)", s, "fp32",
                [_quant_stat(s, "adapter_metrics", e, m) for e, m in pairs],
                _quant_stat(s, "float_model_bytes", scale=1e-6),
                _quant_stat(s, "latency", "float", "median_ms"))
            add("PTQ of float + LoRA (merged)", s, _scheme(s),
                [run_metric(s, e, m) for e, m in pairs],
                _quant_stat(s, "quantized_model_bytes", scale=1e-6),
                _quant_stat(s, "latency", "merged", "median_ms"))
        elif s.method == "qat-lora":
            add("QAT-LoRA (merged, converted)", s, _scheme(s),
                [run_metric(s, e, m) for e, m in pairs],
                _quant_stat(s, "quantized_model_bytes", scale=1e-6),
                _quant_stat(s, "latency", "merged", "median_ms"))
        else:  # qlora: trained on the quantized base; served unmerged or merged
            add("QLoRA (quantized base + float adapter)", s, _scheme(s),
                [run_metric(s, e, m) for e, m in pairs], None,
                _quant_stat(s, "latency", "unmerged", "median_ms"))
            add("QLoRA merged into the quantized base", s, _scheme(s),
                [_quant_stat(s, "merged_metrics", e, m) for e, m in pairs],
                _quant_stat(s, "quantized_model_bytes", scale=1e-6),
                _quant_stat(s, "latency", "merged", "median_ms"))
    bold = set()
    n_q = len(pairs)
    for j in range(n_q + 2):
        col = [(i, st[j].mean) for i, st in enumerate(stats) if st[j] is not None]
        if len(col) > 1:
            lower = j >= n_q or lower_is_better(pairs[j][1])
            best = (min if lower else max)(v for _, v in col)
            bold |= {(i, 3 + j) for i, v in col if v == best}
    note = ("The float + LoRA row is the lora-ptq run's model before quantization (LoRA "
            "trained in float, merged), sized and timed in the same interleaved rounds as its "
            "PTQ; other rows come from their own runs, timed at other moments of a shared "
            "machine, so compare their latencies loosely. "
            if any(s.method == "lora-ptq" for s in qs) else
            "Each row comes from its own run, timed at a different moment of a shared machine, "
            "so compare latencies loosely (add a lora-ptq strategy for a float + LoRA row "
            "timed alongside its quantized model). ")
    return Table("Deployment: quality, size on disk and latency", header, rows, bold, set(),
                 note + "Best value per column in bold (smaller is better for size and "
                 "latency).")


def runs_table(data: StudyData) -> Table:
    """Every run with its status and the notes its training recorded (e.g. an lm_head untied
    from the embeddings so that only the head trains, a classifier newly initialised)."""
    rows = []
    for r in data.rows:
        notes = r.get("notes") or []
        notes = "; ".join(notes) if isinstance(notes, list) else str(notes)
        rows.append([r["strategy"], str(r["seed"]), r["status"],
                     (r.get("error") or "")[:120], notes, str(r.get("run_dir") or "")])
    return Table("Runs", ["strategy", "seed", "status", "error", "notes", "run dir"], rows)


def text_table(t: Table) -> str:
    """A plain-text table for the terminal (best values marked with *)."""
    cells = [[c + ("*" if (i, j) in t.bold else "") for j, c in enumerate(row)]
             for i, row in enumerate(t.rows)]
    widths = [max(len(h), *(len(r[j]) for r in cells)) if cells else len(h)
              for j, h in enumerate(t.header)]
    line = "  ".join("-" * w for w in widths)
    out = [t.title, line, "  ".join(h.ljust(w) for h, w in zip(t.header, widths)), line]
    out += ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in
                      enumerate(zip(r, widths))) for r in cells]
    if t.note:
        out.append(t.note)
    return "\n".join(out)


_NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?$", re.I)


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
    attr = ["" if n else ' class="t"' for n in numeric_columns(t)]  # text: left-aligned
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


def quant_tables(data: StudyData) -> list[Table]:
    """The deployment comparison and the quantization details (empty without quantized runs)."""
    return [t for t in (deploy_table(data), quant_table(data)) if t is not None]


def terminal_report(data: StudyData) -> str:
    parts = [text_table(t) for t in quality_tables(data)] + [text_table(cost_table(data))]
    parts += [text_table(t) for t in quant_tables(data)]
    bad = [r for r in data.rows if r["status"] != "finished"]
    if bad:
        parts.append(text_table(Table("Unfinished runs", ["strategy", "seed", "status", "error"],
                                      [[r["strategy"], str(r["seed"]), r["status"],
                                        (r.get("error") or "")[:100]] for r in bad])))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- plots
def _primary_metric(data: StudyData, set_name: str) -> str | None:
    """The metric a Pareto plot shows for an eval set: BLEU for a `generate` study, perplexity
    for LM sets, else the first higher-is-better metric recorded (F1, BLEU, ...), else the
    first metric."""
    names = data.metrics.get(set_name, [])
    prefs = ("perplexity", "f1", "F1", "BLEU", "bleu", "accuracy")
    if data.config.get("task") == "generate":  # data-to-text: judged by its outputs (E2E: BLEU)
        prefs = ("BLEU", "bleu") + prefs
    for pref in prefs:
        if pref in names:
            return pref
    higher = [m for m in names if not lower_is_better(m)]
    return (higher or names or [None])[0]


def make_plots(data: StudyData) -> dict[str, bytes]:
    """name -> PNG bytes. Only plots with data are made."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}
    names = [s.name for s in data.strategies]
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}

    def save(fig, key: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        plots[key] = buf.getvalue()

    def bar(key: str, cost: str, scale: float, xlabel: str, log: bool = False) -> None:
        items = [(s.name, s.costs[cost]) for s in data.strategies if cost in s.costs
                 and not (s.method == "none" and cost in TRAINING_COSTS)]
        if not items:
            return
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(items) + 1.4))
        y = range(len(items))
        means = [st.mean * scale for _, st in items]
        errs = [st.std * scale for _, st in items]
        ax.barh(list(y), means, xerr=errs if any(errs) else None,
                color=[colors[n] for n, _ in items])
        ax.set_yticks(list(y), [n for n, _ in items])
        ax.invert_yaxis()
        if log and any(m > 0 for m in means):
            ax.set_xscale("log")
            ax.set_xlim(left=max(min(m for m in means if m > 0) / 3, 1))
        for yi, m, e in zip(y, means, errs):  # the label right of the bar and its error bar
            ax.text(m + e if m > 0 else ax.get_xlim()[0], yi,
                    " " + fmt_value(m, "int" if log else "num"), va="center", fontsize=8)
        ax.set_xlim(right=ax.get_xlim()[1] * (3 if log else 1.15))
        ax.set_xlabel(xlabel)
        ax.set_title(f"{data.name}: {xlabel}")
        save(fig, key)

    bar("trainable_params", "trainable_params", 1, "trainable parameters (log)", log=True)
    bar("peak_memory", "peak_memory_bytes", 1e-6, "peak memory (MB)")
    bar("train_time", "train_seconds", 1, "training time (s)")

    # loss curves: every seed, one colour per strategy
    have = [(s, k) for k in ("train_loss", "val_loss") for s in data.strategies
            if any((r.get("curves") or {}).get(k) for r in s.runs)]
    if have:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key in zip(axes, ("train_loss", "val_loss")):
            for s in data.strategies:
                for j, run in enumerate(s.runs):
                    pts = (run.get("curves") or {}).get(key) or []
                    pts = [p for p in pts if len(p) == 2 and _num(p[1]) is not None]
                    if not pts:
                        continue
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[s.name],
                            marker="o" if len(pts) < 12 else None, markersize=3,
                            alpha=1.0 if j == 0 else 0.5, label=s.name if j == 0 else None)
            if key == "val_loss":  # untrained rows: their validation loss as a reference line
                for s in data.strategies:
                    if not any((r.get("curves") or {}).get(key) for r in s.runs):
                        st = s.metrics.get("validation", {}).get("loss")
                        if st is not None:
                            ax.axhline(st.mean, color=colors[s.name], ls="--", lw=1,
                                       label=f"{s.name} (no training)")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("step")
            ax.set_ylabel(key.replace("_", " "))
            ax.set_title(key.replace("_", " "))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not recorded", ha="center", transform=ax.transAxes)
        save(fig, "loss_curves")

    # quality vs trainable parameters, with the Pareto frontier
    panels = [(e, _primary_metric(data, e)) for e in data.eval_sets]
    panels = [(e, m) for e, m in panels if m]
    if panels and any("trainable_params" in s.costs for s in data.strategies):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (set_name, metric) in zip(axes[0], panels):
            pts = [(s.name, s.costs["trainable_params"].mean, s.metrics[set_name][metric])
                   for s in data.strategies if "trainable_params" in s.costs
                   and metric in s.metrics.get(set_name, {})]
            same_x: dict[float, int] = {}
            for n, x, st in pts:
                ax.errorbar([x], [st.mean], yerr=[st.std] if st.n > 1 else None, fmt="o",
                            color=colors[n], label=n)
                k = same_x[x] = same_x.get(x, -1) + 1  # stack labels of equal-size strategies
                ax.annotate(n, (x, st.mean), fontsize=8, xytext=(4, 4 - 11 * k),
                            textcoords="offset points")
            front = pareto_front([(x, st.mean) for _, x, st in pts], lower_is_better(metric))
            if len(front) > 1:
                ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey",
                        lw=1, label="Pareto frontier")
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlabel("trainable parameters")
            ax.set_ylabel(f"{metric} ({'lower' if lower_is_better(metric) else 'higher'} is "
                          "better)")
            ax.set_title(f"{set_name}: {metric} vs trainable params")
            ax.legend(fontsize=7)
        save(fig, "pareto")
    return plots


def pareto_front(points: list[tuple[float, float]], lower_better: bool) -> list[tuple[float, float]]:
    """Points not dominated by any other (fewer or equal params AND better or equal quality),
    sorted by parameter count."""
    sign = 1 if lower_better else -1
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], sign * p[1])):
        if not front or sign * y < sign * front[-1][1]:
            front.append((x, y))
    return front


# ----------------------------------------------------------------------------- documents
PLOT_TITLES = {
    "trainable_params": "Trainable parameters per strategy",
    "loss_curves": "Training and validation loss",
    "peak_memory": "Peak memory",
    "train_time": "Training time",
    "pareto": "Quality vs trainable parameters (Pareto view)",
}


def environment(data: StudyData) -> dict[str, Any]:
    env: dict[str, Any] = {}
    for r in data.rows:
        if r.get("env"):
            env = dict(r["env"])
            break
    env.setdefault("python", platform.python_version())
    env.setdefault("platform", platform.platform())
    return env


def csv_rows(data: StudyData) -> tuple[list[str], list[dict[str, Any]]]:
    metric_cols: list[str] = []
    for r in data.rows:
        for e, ms in (r.get("metrics") or {}).items():
            for m in (ms if isinstance(ms, dict) else {}):
                if f"{e}/{m}" not in metric_cols:
                    metric_cols.append(f"{e}/{m}")
    cost_keys: list[str] = []
    for r in data.rows:
        for k in (r.get("costs") or {}):
            if k not in cost_keys:
                cost_keys.append(k)
    quant_keys: list[str] = []
    for r in data.rows:
        for k in _flatten(r.get("quant")):
            if k not in quant_keys:
                quant_keys.append(k)
    header = (["study", "strategy", "method", "seed", "status", "run_id", "precision"]
              + metric_cols
              + [f"cost/{k}" for k in cost_keys] + [f"quant/{k}" for k in quant_keys]
              + ["run_dir", "adapter", "model", "error"])
    out = []
    for r in data.rows:
        cfg = (r.get("config") or {}).get("study") or {}
        row = {"study": r["study"], "strategy": r["strategy"], "method": cfg.get("method", ""),
               "seed": r["seed"], "status": r["status"], "run_id": r["run_id"],
               # what the run computed in (auto resolved); runs from before auto: their config's
               "precision": (r.get("env") or {}).get("precision")
               or ((r.get("config") or {}).get("train") or {}).get("precision") or "",
               "run_dir": r.get("run_dir") or "", "error": r.get("error") or ""}
        for e, ms in (r.get("metrics") or {}).items():
            for m, v in (ms or {}).items() if isinstance(ms, dict) else ():
                if f"{e}/{m}" in header:
                    row[f"{e}/{m}"] = v
        for k, v in (r.get("costs") or {}).items():
            row[f"cost/{k}"] = v
        for k, v in _flatten(r.get("quant")).items():
            row[f"quant/{k}"] = v
        arts = r.get("artifacts") or {}
        row["adapter"], row["model"] = arts.get("adapter") or "", arts.get("model") or ""
        out.append(row)
    return header, out


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A run's "quant" section as flat CSV columns: nested keys joined by "/" (e.g.
    `latency/merged/median_ms`, `merge_metric_drift/<eval set>/f1`); numbers and the scheme
    name only (paths and notes stay in the run record)."""
    out: dict[str, Any] = {}
    if not isinstance(obj, dict):
        return out
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif _num(v) is not None or key == "scheme":
            out[key] = v
    return out


def write_report(out_dir: str | Path, *, study: str | None = None,
                 db_path: str | Path | None = None) -> list[Path]:
    """Rebuild the report(s) of `out_dir` from its results database alone.

    Writes report.md, report.html, results.csv and plots/*.png (one set per study; with several
    studies in one database the files get a `-<study>` suffix). Returns the written paths."""
    out_dir = Path(out_dir)
    studies = load(db_path or out_dir, study)
    written = []
    for data in studies:
        suffix = "" if len(studies) == 1 else f"-{data.name}"
        written += _write_one(data, out_dir, suffix)
    return written


def _atomic_write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_one(data: StudyData, out_dir: Path, suffix: str) -> list[Path]:
    plots_dir = out_dir / f"plots{suffix}"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = make_plots(data)
    written = []
    for key, png in plots.items():
        p = plots_dir / f"{key}.png"
        _atomic_write(p, png)
        written.append(p)

    qual, cost, runs = quality_tables(data), cost_table(data), runs_table(data)
    quant_tabs = quant_tables(data)
    env = environment(data)
    config_yaml = yaml.safe_dump(data.config, sort_keys=False, allow_unicode=True) \
        if data.config else "(no study config stored)\n"
    seeds = max((len(s.runs) for s in data.strategies), default=0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    n_fin = sum(r["status"] == "finished" for r in data.rows)
    summary = (f"{n_fin} of {len(data.rows)} runs finished; {len(data.strategies)} strategies; "
               f"up to {seeds} seed(s) per strategy" + ("; cells show mean ± std over seeds"
                                                         if seeds > 1 else "")
               + ". Best measured value per column in bold.")
    desc = str(data.config.get("description") or "").strip()
    setup = (f"model `{data.config.get('model', '?')}`, task `{data.config.get('task', '?')}`, "
             f"trained on `{_data_name(data.config.get('data'))}`, budget "
             f"`{json.dumps(data.config.get('budget', {}))}`")

    # markdown
    md = [f"# loralab study: {data.name}", "", f"_Generated {stamp} from the results database._",
          ""]
    if desc:
        md += [desc, ""]
    md += [setup + ".", "", summary, "", "## Quality", ""]
    md += [md_table(t) + "\n" for t in qual] or ["(no finished runs with metrics)\n"]
    md += ["## Cost", "", md_table(cost), ""]
    if quant_tabs:
        md += ["## Quantization", ""] + [md_table(t) + "\n" for t in quant_tabs]
    md += ["## Plots", ""]
    md += [f"![{PLOT_TITLES[k]}](plots{suffix}/{k}.png)\n" for k in plots]
    md += ["## Runs", "", md_table(runs), "", "## Study configuration", "", "```yaml",
           config_yaml.rstrip(), "```", "", "## Environment", "", "```json",
           json.dumps(env, indent=2, default=str), "```", ""]
    md_path = out_dir / f"report{suffix}.md"
    _atomic_write(md_path, "\n".join(md))

    # html (self-contained)
    imgs = "".join(
        f'<figure><img alt="{html.escape(PLOT_TITLES[k])}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(PLOT_TITLES[k])}'
        "</figcaption></figure>" for k, png in plots.items())
    body = [f"<h1>loralab study: {html.escape(data.name)}</h1>",
            f'<p class="note">Generated {stamp} from the results database.</p>']
    if desc:
        body.append(f"<p>{html.escape(desc)}</p>")
    body += [f"<p>{_code_html(setup)}.</p>", f"<p>{html.escape(summary)}</p>", "<h2>Quality</h2>"]
    body += [html_table(t) for t in qual] or ["<p>(no finished runs with metrics)</p>"]
    body += ["<h2>Cost</h2>", html_table(cost)]
    if quant_tabs:
        body += ["<h2>Quantization</h2>"] + [html_table(t) for t in quant_tabs]
    body += ["<h2>Plots</h2>", imgs, "<h2>Runs</h2>",
             html_table(runs), "<h2>Study configuration</h2>",
             f"<pre>{html.escape(config_yaml)}</pre>", "<h2>Environment</h2>",
             f"<pre>{html.escape(json.dumps(env, indent=2, default=str))}</pre>"]
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>loralab study: {html.escape(data.name)}</title><style>{_CSS}</style></head>"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n")
    html_path = out_dir / f"report{suffix}.html"
    _atomic_write(html_path, page)

    # csv
    header, rows = csv_rows(data)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = out_dir / f"results{suffix}.csv"
    _atomic_write(csv_path, buf.getvalue())
    return [md_path, html_path, csv_path] + written


def _data_name(data: Any) -> str:
    return data.get("name", "?") if isinstance(data, dict) else str(data)


def _code_html(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


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
