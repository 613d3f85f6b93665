"""From rows of the results database to a study's aggregated results (`StudyData`).

Nothing here knows which metrics exist: the quality columns are whatever the run records hold,
per evaluation set. The only metric knowledge is the direction (lower is better for names like
loss, perplexity, TER), used to mark the best value of a column. With several seeds a value is
aggregated as mean and sample standard deviation (n - 1) over the seeds (`Stat`).

What the report knows about a method (does it train? is it quantized?) comes from the strategy
registry (`loralab.training.strategies.registry`), never from its name. The report reads run
records and the database; it never writes a run record.
"""

from __future__ import annotations

import math
import platform
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.errors import UserError
from loralab.results.database import ResultsDB, find_db
from loralab.training.strategies.registry import PEFT, StrategySpec, get_spec, names

# Metric-name tokens meaning "lower is better" (everything else: higher is better).
_LOWER_TOKENS = {"loss", "perplexity", "ppl", "nll", "ter", "wer", "cer", "bpc", "bpb", "error",
                 "seconds", "time"}

COUNT_KEYS = ("targets", "examples", "num_examples", "generated")
"""Bookkeeping numbers in a metrics dict that are not quality (how many targets were scored)."""

# What a Pareto view prefers to show for an eval set, first match wins.
_PRIMARY = ("perplexity", "f1", "F1", "BLEU", "bleu", "accuracy")


def lower_is_better(metric: str) -> bool:
    """True for metrics where smaller is better (loss, perplexity, TER, time, ...), by the
    lower-case tokens of the name (`val_loss` -> {"val", "loss"})."""
    tokens = set(re.split(r"[^a-z]+", metric.lower()))
    lower = metric.lower()
    return bool(tokens & _LOWER_TOKENS) or "loss" in lower or "perplexity" in lower


def as_number(value: Any) -> float | None:
    """`value` as a float when it is a real number (not a bool, not NaN), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def dig(obj: Any, *path: str) -> float | None:
    """obj[path[0]][path[1]]... as a number, None when any step is missing."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return as_number(obj)


def method_spec(method: str | None) -> StrategySpec | None:
    """The registry's spec of `method`, None for a missing or unknown one (an old record)."""
    return get_spec(method) if method in names() else None


PEFT_TYPE_NAMES = {"LORA": "LoRA", "IA3": "IA3", "VERA": "VeRA", "LOHA": "LoHa", "LOKR": "LoKr",
                   "ADALORA": "AdaLoRA", "BOFT": "BOFT", "OFT": "OFT", "FOURIERFT": "FourierFT",
                   "HRA": "HRA", "VBLORA": "VBLoRA", "LN_TUNING": "LN-tuning"}
"""How the report spells PEFT's type names (PEFT's own spelling); others as the study wrote."""


def implementation(method: str | None, peft: dict[str, Any] | None = None) -> str:
    """Whose implementation a run trained, as the report marks it: "loralab" for loralab's own
    methods, "PEFT <type>" for a PEFT method (registry `library`), the type from its `peft`
    mapping (default LoRA): "PEFT LoRA", "PEFT IA3"; "–" for a method that trains nothing or an
    unknown one (an old record)."""
    spec = method_spec(method)
    if spec is None or not spec.trains:
        return "–"
    if spec.library != PEFT:
        return spec.library
    raw = str((peft or {}).get("type") or "LoRA")
    key = raw.upper().replace("-", "_")
    key = key[:-6] if key.endswith("CONFIG") else key
    return f"PEFT {PEFT_TYPE_NAMES.get(key, raw)}"


def run_implementation(row: dict[str, Any]) -> str:
    """`implementation` of one database row, from its study config (else its train config)."""
    config = row.get("config") or {}
    study, train = config.get("study") or {}, config.get("train") or {}
    return implementation(study.get("method") or train.get("method"),
                          study.get("peft") or train.get("peft"))


@dataclass
class Stat:
    """One number over the seeds of a strategy: mean and sample standard deviation (n - 1)."""

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
    """A study strategy's finished runs and their numbers aggregated over seeds."""

    name: str
    method: str | None
    runs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, dict[str, Stat]] = field(default_factory=dict)  # eval set -> metric -> Stat
    costs: dict[str, Stat] = field(default_factory=dict)

    @property
    def trains(self) -> bool:
        """False for a method that trains nothing (`none`): it has no training costs."""
        spec = method_spec(self.method)
        return spec is None or spec.trains

    @property
    def quantized(self) -> bool:
        """True for a method that quantizes the base and records a "quant" section."""
        spec = method_spec(self.method)
        return spec is not None and spec.quantized

    @property
    def implementation(self) -> str:
        """Whose implementation the runs trained (`implementation`): "loralab", "PEFT LoRA",
        ...; several, comma-joined, if the seeds disagree."""
        found = list(dict.fromkeys(run_implementation(r) for r in self.runs))
        return ", ".join(found) if found else implementation(self.method)


@dataclass
class StudyData:
    """One study of the database: its config, every run row and the aggregated strategies."""

    name: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    strategies: list[StrategyResult]
    eval_sets: list[str]
    metrics: dict[str, list[str]]  # eval set -> metric names in first-seen order

    @property
    def published(self) -> dict[str, Any] | None:
        return self.config.get("published")


def _eval_names(config: dict[str, Any]) -> list[str]:
    return [e if isinstance(e, str) else e.get("name") for e in config.get("eval", []) if e]


def _add_run(res: StrategyResult, row: dict[str, Any], eval_sets: list[str],
             metric_names: dict[str, list[str]]) -> None:
    """Add one finished run's metrics and costs to `res`, noting new eval sets and metrics."""
    res.runs.append(row)
    for set_name, metrics in (row.get("metrics") or {}).items():
        if not isinstance(metrics, dict):
            continue
        if set_name not in eval_sets:
            eval_sets.append(set_name)
        seen = metric_names.setdefault(set_name, [])
        for metric, value in metrics.items():
            v = as_number(value)
            if v is None:
                continue
            if metric not in seen:
                seen.append(metric)
            res.metrics.setdefault(set_name, {}).setdefault(metric, Stat([])).values.append(v)
    for key, value in (row.get("costs") or {}).items():
        v = as_number(value)
        if v is not None:
            res.costs.setdefault(key, Stat([])).values.append(v)


def collect(rows: list[dict[str, Any]], name: str, config: dict[str, Any] | None = None
            ) -> StudyData:
    """Group finished run rows by strategy (in the study's order) and aggregate over seeds.

    `rows` are `ResultsDB.list_runs()` rows of one study; `config` its stored study config.
    Strategies the config does not name follow in first-seen order. The eval sets are the
    study's own when it names them (the CSV keeps every split the runs recorded)."""
    config = config or {}
    specs = [s for s in config.get("strategies", []) if isinstance(s, dict)]
    order = [s.get("name") for s in specs]
    methods = {s.get("name"): s.get("method") for s in specs}
    by_name: dict[str, StrategyResult] = {}
    eval_sets = _eval_names(config)
    metric_names: dict[str, list[str]] = {}
    for row in rows:
        if row.get("status") != "finished":
            continue
        res = by_name.setdefault(row["strategy"], StrategyResult(
            row["strategy"], methods.get(row["strategy"])
            or ((row.get("config") or {}).get("study") or {}).get("method")))
        _add_run(res, row, eval_sets, metric_names)
    ordered = [by_name[n] for n in order if n in by_name]
    ordered += [r for n, r in by_name.items() if n not in order]
    configured = [e for e in eval_sets if e in metric_names and e in _eval_names(config)]
    eval_sets = configured or [e for e in eval_sets if e in metric_names]
    for found in metric_names.values():
        found[:] = [m for m in found if m not in COUNT_KEYS]
    return StudyData(name=name, config=config, rows=rows, strategies=ordered,
                     eval_sets=eval_sets, metrics=metric_names)


def load(db_path: str | Path, study: str | None = None) -> list[StudyData]:
    """Every study in the database (or just `study`) with its finished runs aggregated.

    `db_path` is a results.sqlite file or a folder holding one (`find_db`). Raises UserError
    when `study` is not in the database or the database holds no runs."""
    with ResultsDB(find_db(db_path)) as db:
        studies = {s["name"]: s["config"] for s in db.studies()}
        rows = db.list_runs()
    found = list(studies) + sorted({r["study"] for r in rows} - set(studies))
    if study is not None:
        if study not in found:
            raise UserError(f"no study '{study}' in {db_path}; studies there: "
                            f"{', '.join(found) or 'none'}")
        found = [study]
    if not found:
        raise UserError(f"the results database in {db_path} holds no runs; run `loralab "
                        "compare` first")
    return [collect([r for r in rows if r["study"] == n], n, studies.get(n)) for n in found]


def primary_metric(data: StudyData, set_name: str) -> str | None:
    """The metric a Pareto view shows for an eval set: BLEU for a `generate` study, perplexity
    for LM sets, else the first higher-is-better metric recorded (F1, BLEU, ...), else the
    first metric; None when the set has no metric."""
    found = data.metrics.get(set_name, [])
    prefs: tuple[str, ...] = _PRIMARY
    if data.config.get("task") == "generate":  # data-to-text: judged by its outputs (E2E: BLEU)
        prefs = ("BLEU", "bleu") + prefs
    for pref in prefs:
        if pref in found:
            return pref
    higher = [m for m in found if not lower_is_better(m)]
    return next(iter(higher or found), None)


def environment(data: StudyData) -> dict[str, Any]:
    """The first recorded run environment (versions, device), plus this Python and platform."""
    env: dict[str, Any] = {}
    for r in data.rows:
        if r.get("env"):
            env = dict(r["env"])
            break
    env.setdefault("python", platform.python_version())
    env.setdefault("platform", platform.platform())
    return env
