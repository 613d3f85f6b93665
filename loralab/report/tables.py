"""The report's tables, as rows of formatted cells: quality, cost, quantization, deployment, runs.

A `Table` is format-neutral (render.py turns it into text, markdown or HTML). Cells hold
formatted numbers: `mean ± std` over seeds when there are several, "–" when a value is
missing, `NOT_TRAINED` for a training cost of a method that trains nothing. The best measured
value of a column is marked bold; published rows (numbers from the study file's `published:`)
are italic and never compared for "best".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loralab.report.collect import (
    Stat,
    StrategyResult,
    StudyData,
    as_number,
    dig,
    lower_is_better,
    primary_metric,
)
from loralab.training.strategies.registry import LORALAB

NOT_TRAINED = "—"
"""The cell of a training cost for a method that trains nothing (the untuned model)."""

COST_COLUMNS = (
    ("trainable_params", "trainable params", 1, "int"),
    ("trainable_pct", "% of total", 1, "pct"),
    ("artifact_bytes", "adapter/model MB", 1e-6, "num"),
    ("data_seconds", "data prep (s)", 1, "num"),
    ("train_seconds", "train time (s)", 1, "num"),
    ("tokens_per_second", "tokens/s", 1, "num"),
    ("peak_memory_bytes", "peak memory (MB)", 1e-6, "num"),
)
"""(cost key, column title, unit scale, format) of the cost table."""

TRAINING_COSTS = ("artifact_bytes", "train_seconds", "tokens_per_second", "peak_memory_bytes")
"""Costs a method that trains nothing has no business reporting: its train time, throughput
and sampled peak memory are noise. Shown as NOT_TRAINED."""

RUN_TIME_PARTS = (("load_seconds", "model loading"), ("data_seconds", "data preparation"),
                  ("train_seconds", "training"), ("eval_seconds", "evaluation"),
                  ("generation_seconds", "generation"))


def fmt_value(x: float, kind: str = "num") -> str:
    """A number for a cell: `int` with thousands separators, `pct` with a % sign, else 4
    significant digits (scientific notation below 1e-3 and from 1e5)."""
    if kind == "int":
        return f"{int(round(x)):,}"
    if kind == "pct":
        return f"{x:.3g}%" if x < 100 else f"{x:.0f}%"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3e}"
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"


def fmt_stat(stat: Stat | None, kind: str = "num") -> str:
    """`mean ± std` over seeds ("mean" alone for one seed or no spread; "–" for no value)."""
    if stat is None:
        return "–"
    text = fmt_value(stat.mean, kind)
    if stat.n > 1 and stat.std != 0:
        text += f" ± {fmt_value(stat.std, 'num' if kind == 'int' else kind)}"
    return text


@dataclass
class Table:
    """A titled table of formatted cells (strings), with the cells to emphasise."""

    title: str
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, col) cells in bold
    italic_rows: set[int] = field(default_factory=set)       # published rows
    note: str = ""


def _best_cells(values: list[tuple[int, float]], col: int, lower: bool) -> set[tuple[int, int]]:
    """(row, col) of the best of `values` [(row, value)]; none when fewer than two compete."""
    if len(values) < 2:
        return set()
    best = (min if lower else max)(v for _, v in values)
    return {(i, col) for i, v in values if v == best}


# ----------------------------------------------------------------------------- quality
def _published_note(published: dict[str, Any]) -> str:
    return ("Rows marked (published) are numbers reported in "
            f"{published.get('source', 'the literature')}, not measured here"
            + (f"; {published['note']}" if published.get("note") else "") + ".")


def quality_table(data: StudyData, set_name: str) -> Table:
    """Rows = strategies (+ published rows), columns = the eval set's metrics; best in bold."""
    published = data.published or {}
    metrics = list(data.metrics.get(set_name, []))
    pub_rows = [r for r in published.get("rows", []) if set_name in (r.get("metrics") or {})]
    for r in pub_rows:  # a published metric the runs do not measure still gets a column
        metrics += [m for m in r["metrics"][set_name] if m not in metrics]
    bold: set[tuple[int, int]] = set()
    for col, metric in enumerate(metrics, start=2):
        stats = [(i, s.metrics.get(set_name, {}).get(metric)) for i, s in
                 enumerate(data.strategies)]
        means = [(i, st.mean) for i, st in stats if st is not None]
        bold |= _best_cells(means, col, lower_is_better(metric))
    rows = [[s.name, str(len(s.runs))]
            + [fmt_stat(s.metrics.get(set_name, {}).get(m)) for m in metrics]
            for s in data.strategies]
    italic = set()
    for r in pub_rows:
        italic.add(len(rows))
        vals = r["metrics"][set_name]
        rows.append([f"{r['name']} (published)", "–"]
                    + [fmt_value(float(vals[m])) if as_number(vals.get(m)) is not None else "–"
                       for m in metrics])
    return Table(f"Quality on {set_name}", ["strategy", "seeds"] + metrics, rows, bold, italic,
                 _published_note(published) if pub_rows else "")


def quality_tables(data: StudyData) -> list[Table]:
    """One quality table per eval set of the study."""
    return [quality_table(data, set_name) for set_name in data.eval_sets]


# ----------------------------------------------------------------------------- cost
def run_time_note(data: StudyData) -> str:
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


def marks_implementation(data: StudyData) -> bool:
    """Whether the cost table gets an "implementation" column: when a row trained another
    library's implementation (PEFT), so loralab's and PEFT's rows are told apart; a study of
    loralab's methods only keeps the table it always had."""
    return any(s.implementation not in (LORALAB, "–") for s in data.strategies)


def _cost_cells(s: StrategyResult, marked: bool = False) -> list[str]:
    cells = [s.name, s.method or "–"] + ([s.implementation] if marked else [])
    for key, _, scale, kind in COST_COLUMNS:
        if not s.trains and key in TRAINING_COSTS:
            cells.append(NOT_TRAINED)
            continue
        st = s.costs.get(key)
        cells.append(fmt_stat(Stat([v * scale for v in st.values]) if st else None, kind))
    return cells


def cost_table(data: StudyData) -> Table:
    """Rows = strategies (+ published parameter counts), columns = COST_COLUMNS; after the
    method, the implementation each row trained when the study mixes loralab's and PEFT's
    (`marks_implementation`)."""
    marked = marks_implementation(data)
    header = (["strategy", "method"] + ["implementation"] * marked
              + [title for _, title, _, _ in COST_COLUMNS])
    rows = [_cost_cells(s, marked) for s in data.strategies]
    italic = set()
    for r in (data.published or {}).get("rows", []):
        if r.get("params") is not None:
            italic.add(len(rows))
            rows.append([f"{r['name']} (published)", "–"] + ["–"] * marked
                        + [fmt_value(float(r["params"]), "int")]
                        + ["–"] * (len(COST_COLUMNS) - 1))
    return Table("Cost per strategy", header, rows, set(), italic,
                 run_time_note(data) + "Peak memory is the growth of the process's resident "
                 "memory during training (see the run records for tensor-level peaks); "
                 "adapter/model MB is the size on disk of "
                 f"what the run saved. {NOT_TRAINED} = not trained (the untuned model): no "
                 "training cost to measure." + (
                     " Implementation: loralab = loralab's own layers; PEFT <type> = Hugging "
                     "Face PEFT's own implementation, trained by the same loop, budget and data "
                     "order (method peft)." if marked else ""))


# ----------------------------------------------------------------------------- quantization
def quant_stat(s: StrategyResult, *path: str, scale: float = 1.0) -> Stat | None:
    """A number of the runs' "quant" sections aggregated over seeds (None if no run has it)."""
    values = [v * scale for r in s.runs if (v := dig(r.get("quant"), *path)) is not None]
    return Stat(values) if values else None


def _quant_sections(s: StrategyResult) -> list[dict[str, Any]]:
    return [r["quant"] for r in s.runs if isinstance(r.get("quant"), dict)]


def quant_strategies(data: StudyData) -> list[StrategyResult]:
    """Strategies of a quantized method (registry) whose finished runs carry a "quant" section."""
    return [s for s in data.strategies if s.quantized and _quant_sections(s)]


def quant_metrics(data: StudyData) -> list[tuple[str, str]]:
    """(eval set, metric) pairs the quantization tables show: each eval set's primary metric,
    plus accuracy when that is not the primary one."""
    out: list[tuple[str, str]] = []
    for e in data.eval_sets:
        for m in (primary_metric(data, e), "accuracy"):
            if m and m in data.metrics.get(e, []) and (e, m) not in out:
                out.append((e, m))
    return out


def _scheme(s: StrategyResult) -> str:
    return ", ".join(sorted({str(q.get("scheme")) for q in _quant_sections(s)})) or "–"


def quant_table(data: StudyData) -> Table | None:
    """Quantized strategies: sizes, latency and the drift of merging the adapter into the
    quantized model (merged Q(W + s B A) vs unmerged Q(W) + s B A), from each run's "quant"
    section as the quantization step measured it. None when no run has one."""
    qs = quant_strategies(data)
    if not qs:
        return None
    pairs = quant_metrics(data)
    header = ["strategy", "method", "scheme", "float MB (fp32 weights)", "quantized MB (disk)",
              "latency unmerged (ms)", "latency merged (ms)", "logit drift (max abs)",
              "logit drift mean KL", "top-1 agreement"]
    header += [f"Δ {m} merged−unmerged ({e})" for e, m in pairs]
    rows = []
    for s in qs:
        rows.append([s.name, s.method or "–", _scheme(s)] + [fmt_stat(st) for st in (
            quant_stat(s, "float_weight_bytes", scale=1e-6),
            quant_stat(s, "quantized_model_bytes", scale=1e-6),
            quant_stat(s, "latency", "unmerged", "median_ms"),
            quant_stat(s, "latency", "merged", "median_ms"),
            quant_stat(s, "merge_logit_drift", "max_abs"),
            quant_stat(s, "merge_logit_drift", "mean_kl"),
            quant_stat(s, "merge_logit_drift", "top1_agreement"),
            *(quant_stat(s, "merge_metric_drift", e, m) for e, m in pairs))])
    return Table("Quantization: size, latency and merge drift", header, rows, set(), set(),
                 "Float MB = 4 bytes x logical parameters; quantized MB = the merged quantized "
                 "model as saved (quantized/model.pt, torch.save state dict). Latency: median "
                 "forward pass over one validation batch, merged and unmerged timed "
                 "interleaved in the same run. Merge drift compares the deployed merged model "
                 "Q(W + s B A) with the unmerged Q(W) + s B A (logits on up to 4 validation "
                 "batches; Δ metric = merged − unmerged on the eval set).")


# ----------------------------------------------------------------------------- deployment
@dataclass(frozen=True)
class DeployRow:
    """One deployed model of a strategy: its label and where its numbers are in the record.

    quality: "run" = the run's own metrics, else the key of the "quant" section holding them;
    size: key of the "quant" section (None: no model file of its own); latency: key of
    "quant.latency"."""

    label: str
    scheme: str | None  # None: the runs' quantization scheme
    quality: str
    size: str | None
    latency: str


# What a quantized run deployed, told apart by its record's "quant" section (see
# `deploy_rows`): which model the run's own metrics describe, and whether the float model
# before quantization was measured alongside.
_FLOAT_REFERENCE = (
    DeployRow("float + LoRA (merged, fp32)", "fp32", "adapter_metrics", "float_model_bytes",
              "float"),
    DeployRow("PTQ of float + LoRA (merged)", None, "run", "quantized_model_bytes", "merged"))
_MERGED = (DeployRow("QAT-LoRA (merged, converted)", None, "run", "quantized_model_bytes",
                     "merged"),)
_UNMERGED = (
    DeployRow("QLoRA (quantized base + float adapter)", None, "run", None, "unmerged"),
    DeployRow("QLoRA merged into the quantized base", None, "merged_metrics",
              "quantized_model_bytes", "merged"))


def has_float_reference(s: StrategyResult) -> bool:
    """The runs measured the float merged model W + s B A before quantizing it (post-training
    quantization): its size is under "quant.float_model_bytes"."""
    return any("float_model_bytes" in q for q in _quant_sections(s))


def deploy_rows(s: StrategyResult) -> tuple[DeployRow, ...]:
    """The deployed models of a quantized strategy, read from its runs' "quant" sections.

    The quantization step records `adapter_metrics` (the trained model before deployment) only
    when the run's own metrics are those of the merged, quantized model Q(W + s B A); without
    them the run's metrics are the model it trained, Q(W) + s B A (quantized base, float
    adapter), and the merged model's metrics are under `merged_metrics`."""
    if has_float_reference(s):
        return _FLOAT_REFERENCE
    if any("adapter_metrics" in q for q in _quant_sections(s)):
        return _MERGED
    return _UNMERGED


def _deployed_quality(s: StrategyResult, d: DeployRow, set_name: str, metric: str
                      ) -> Stat | None:
    if d.quality == "run":
        return s.metrics.get(set_name, {}).get(metric)
    return quant_stat(s, d.quality, set_name, metric)


def _deploy_note(qs: list[StrategyResult]) -> str:
    if any(has_float_reference(s) for s in qs):
        return ("The float + LoRA row is the lora-ptq run's model before quantization (LoRA "
                "trained in float, merged), sized and timed in the same interleaved rounds as "
                "its PTQ; other rows come from their own runs, timed at other moments of a "
                "shared machine, so compare their latencies loosely. ")
    return ("Each row comes from its own run, timed at a different moment of a shared machine, "
            "so compare latencies loosely (add a lora-ptq strategy for a float + LoRA row "
            "timed alongside its quantized model). ")


def deploy_table(data: StudyData) -> Table | None:
    """The deployment comparison: quality, size on disk and latency of the float LoRA model
    (merged fp32, measured in lora-ptq runs), its post-training quantization, QAT-LoRA and the
    QLoRA model merged into its quantized base, side by side. Best per column in bold (smaller
    is better for size and latency). None without quantized runs."""
    qs = quant_strategies(data)
    if not qs:
        return None
    pairs = quant_metrics(data)
    header = ["deployed model", "strategy", "scheme"] + [f"{m} ({e})" for e, m in pairs] + [
        "model MB (disk)", "latency (ms)"]
    rows: list[list[str]] = []
    stats: list[list[Stat | None]] = []
    for s in qs:
        for d in deploy_rows(s):
            cells = [_deployed_quality(s, d, e, m) for e, m in pairs] + [
                quant_stat(s, d.size, scale=1e-6) if d.size else None,
                quant_stat(s, "latency", d.latency, "median_ms")]
            rows.append([d.label, s.name, d.scheme or _scheme(s)] + [fmt_stat(c) for c in cells])
            stats.append(cells)
    bold: set[tuple[int, int]] = set()
    for j in range(len(pairs) + 2):
        col = [(i, st.mean) for i, row in enumerate(stats) if (st := row[j]) is not None]
        lower = j >= len(pairs) or lower_is_better(pairs[j][1])
        bold |= _best_cells(col, 3 + j, lower)
    return Table("Deployment: quality, size on disk and latency", header, rows, bold, set(),
                 _deploy_note(qs) + "Best value per column in bold (smaller is better for size "
                 "and latency).")


def quant_tables(data: StudyData) -> list[Table]:
    """The deployment comparison and the quantization details (empty without quantized runs)."""
    return [t for t in (deploy_table(data), quant_table(data)) if t is not None]


# ----------------------------------------------------------------------------- runs
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


def unfinished_table(data: StudyData) -> Table | None:
    """Runs that failed or did not finish, with their error (None when every run finished)."""
    bad = [r for r in data.rows if r["status"] != "finished"]
    if not bad:
        return None
    return Table("Unfinished runs", ["strategy", "seed", "status", "error"],
                 [[r["strategy"], str(r["seed"]), r["status"], (r.get("error") or "")[:100]]
                  for r in bad])
