"""Studies: a YAML file -> a matrix of runs (strategy x seed) -> records in the results database.

A study fixes everything but the fine-tuning strategy: one model, one task, one training set,
one or more evaluation sets and one budget (steps or epochs, batch, sequence length, learning
rate). Every strategy trains on the same data in the same order (the data order depends only on
the seed, and every strategy of a seed gets the same seed), so differences between rows come
from the strategy alone. The untuned model (`method: none`) is always a row: it is the baseline
every other row has to beat.

`run_study` is resumable at any point: a run whose row says `finished` (with the same config) is
skipped; a run whose directory has a `record.json` that says finished is ingested without
training; a run with checkpoints is resumed (`resume=True`); anything else is trained afresh.
The function that trains one run is injected (`run_fn(config: dict, resume: bool) -> record`),
so the bookkeeping is testable without training and `train.train` is wired in by default.

    name: default                 # study name: output goes to <out>/<name>/
    model: smollm2-135m           # a bundled name, a local dir or a hub id
    task: lm                      # lm | classify | generate
    data: wiki-leads              # training set: a preset name or {name, fraction, options}
    eval: [wiki-leads, wiki-lambada]   # eval sets: names or {name, data, split, max_examples}
    budget: {max_steps: 20, batch_size: 4, grad_accum: 1, seq_len: 96, lr: 2.0e-4}
    seeds: 1                      # an int N (seeds 0..N-1) or a list of seeds
    strategies:
      - {name: full, method: full, lr: 5.0e-5}
      - {name: lora-1, method: lora, preset: attn, rank: 8, alpha: 16}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from loralab.data.tasks import subsample
from loralab.errors import UserError

METHODS = ("none", "full", "head", "lora", "lora-head", "qat-lora", "qlora", "lora-ptq")
TASKS = ("lm", "classify", "generate")
PRESETS = ("qv", "attn", "attn-proj", "attn-proj-ffn", "all")

STUDY_FIELDS = ("name", "description", "model", "task", "data", "eval", "budget", "seeds",
                "strategies", "published", "train_options", "num_labels", "report_to")
DATA_FIELDS = ("name", "fraction", "options")
EVAL_FIELDS = ("name", "data", "split", "max_examples", "options", "generate")
GENERATE_FIELDS = ("max_examples", "max_new_tokens", "num_beams", "length_penalty",
                   "no_repeat_ngram_size", "prompt_tokens", "java")
BUDGET_FIELDS = ("epochs", "max_steps", "batch_size", "grad_accum", "seq_len", "lr",
                 "warmup_steps", "warmup_ratio", "weight_decay", "label_smoothing", "schedule",
                 "grad_clip", "precision", "eval_every", "eval_batches", "eval_max_examples")
_INT_BUDGET = ("max_steps", "batch_size", "grad_accum", "seq_len", "warmup_steps", "eval_every",
               "eval_batches", "eval_max_examples")
_STR_BUDGET = ("schedule", "precision")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGY_FIELDS = ("name", "method", "preset", "targets", "rank", "alpha", "dropout", "lr",
                   "rslora", "head_epochs", "epochs", "max_steps", "options")
PUBLISHED_FIELDS = ("source", "note", "rows")
PUBLISHED_ROW_FIELDS = ("name", "params", "metrics")

RunFn = Callable[[dict[str, Any], bool], dict[str, Any]]


# ----------------------------------------------------------------------------- YAML with lines
class _LineLoader(yaml.SafeLoader):
    """A safe YAML loader whose mappings remember the line of each key (for error messages)."""


class _Map(dict):
    lines: dict[str, int]


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[str(key)] = key_node.start_mark.line + 1
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _plain(obj: Any) -> Any:
    """Drop the line bookkeeping: plain dicts/lists, JSON-serialisable."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- the study model
@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: `name` labels the report column, `data` is the dataset preset."""

    name: str
    data: str
    split: str = "test"
    max_examples: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] | None = None
    """Also decode and score generations (BLEU, NIST, METEOR, ROUGE, CIDEr, chrF, TER): for a
    `generate` task against the split's references, for `lm` as continuations of held-out
    text (the first prompt_tokens of a block as prompt, the rest as reference)."""


@dataclass(frozen=True)
class Strategy:
    """One row of the study: a fine-tuning method with its hyper-parameters."""

    name: str
    method: str
    preset: str | None = None
    targets: tuple[str, ...] | None = None
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    lr: float | None = None
    rslora: bool | None = None
    head_epochs: float | None = None
    epochs: float | None = None
    max_steps: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Study:
    name: str
    model: str
    task: str
    data: str
    data_fraction: float | None
    data_options: dict[str, Any]
    eval: tuple[EvalSet, ...]
    budget: dict[str, Any]
    seeds: tuple[int, ...]
    strategies: tuple[Strategy, ...]
    published: dict[str, Any] | None = None
    train_options: dict[str, Any] = field(default_factory=dict)
    num_labels: int | None = None
    description: str = ""
    path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    report_to: tuple[str, ...] | None = None
    """Trackers of every run (loralab.training.tracking; None: TrainConfig's default, TensorBoard)."""


@dataclass(frozen=True)
class RunSpec:
    """One cell of the matrix: which strategy, which seed, where, with which train config."""

    run_id: str
    strategy: str
    seed: int
    run_dir: Path
    config: dict[str, Any]

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


def config_hash(config: dict[str, Any]) -> str:
    """The identity of a run's computation: a finished run with the same hash is reused. The
    tracking settings (`tracking.TRACKING_FIELDS`: where results are reported) are left out,
    so turning W&B or MLflow on does not re-train finished runs."""
    from loralab.training.tracking import TRACKING_FIELDS

    kept = {k: v for k, v in config.items() if k not in TRACKING_FIELDS}
    blob = json.dumps(kept, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading
class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: dict | None, key: str | None, msg: str) -> None:
        line = getattr(where, "lines", {}).get(key) if where is not None and key else None
        # a key set on the command line names its override instead of a file line
        loc = line if isinstance(line, str) else f"{self.source}:{line}" if line else self.source
        raise UserError(f"{loc}: {msg}")

    def fields(self, obj: Any, valid: tuple[str, ...], what: str) -> dict:
        if not isinstance(obj, dict):
            self.fail(None, None, f"{what} must be a mapping (key: value), got {type(obj).__name__}; "
                      f"valid fields: {', '.join(valid)}")
        for key in obj:
            if key not in valid:
                self.fail(obj, key, f"unknown field '{key}' in {what}; valid fields: "
                          f"{', '.join(valid)}")
        return obj

    def number(self, obj: dict, key: str, what: str, *, kind: type = float,
               minimum: float | None = None, exclusive: bool = False) -> Any:
        value = obj.get(key)
        if value is None:
            return None
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind is int:
            ok = float(value).is_integer()
        if ok and minimum is not None:
            ok = value > minimum if exclusive else value >= minimum
        if not ok:
            bound = "" if minimum is None else f" {'>' if exclusive else '>='} {minimum:g}"
            self.fail(obj, key, f"{what} '{key}' must be {'an integer' if kind is int else 'a number'}"
                      f"{bound}, got {value!r}; fix the value")
        return kind(value)


def resolve_study_path(spec: str | os.PathLike | None) -> Path:
    """A study argument -> a file: a path, or the name of a bundled study (`default`,
    `gpt2-wikitext2-offline`, ...). No argument means the bundled `default` study."""
    if spec is None:
        spec = "default"
    path = Path(spec)
    if path.is_file():
        return path
    bundled = bundled_studies()
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if stem in bundled and not path.parent.parts:
        return bundled[stem]
    raise UserError(f"study file not found: {spec}; pass a YAML path or a bundled study name "
                    f"({', '.join(sorted(bundled))})")


def bundled_studies() -> dict[str, Path]:
    """The study files shipped inside the package (`loralab/studies/*.yaml`)."""
    root = resources.files("loralab") / "studies"
    out = {}
    if root.is_dir():
        for item in root.iterdir():
            if item.name.endswith(".yaml"):
                out[item.name[:-5]] = Path(str(item))
    return out


def load_study(path: str | os.PathLike, overrides: tuple[str, ...] | list[str] = ()) -> Study:
    """Read and strictly validate a study file. Raises UserError with file:line on bad input.
    `overrides` (`budget.max_steps=5`, ...; `loralab.study.overrides`) change the parsed mapping
    before validation, so they are checked exactly as the file is."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read study file {path}: {exc.strerror}; check the path") from None
    return parse_study(text, source=str(path), overrides=overrides)


def parse_study(text: str, source: str = "<study>",
                overrides: tuple[str, ...] | list[str] = ()) -> Study:
    try:
        raw = yaml.load(text, Loader=_LineLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{source}{line}: not valid YAML ({problem}); fix the syntax at that "
                        "line") from None
    ck = _Checker(source)
    if not isinstance(raw, dict):
        ck.fail(None, None, "a study file must be a YAML mapping with fields "
                f"{', '.join(STUDY_FIELDS)}")
    if overrides:
        from loralab.study.overrides import apply_overrides

        raw = apply_overrides(raw, overrides)
    ck.fields(raw, STUDY_FIELDS, "the study")
    for key in ("name", "model", "task", "data", "eval", "strategies"):
        if raw.get(key) in (None, "", []):
            ck.fail(None, None, f"missing field '{key}'; add it (required: name, model, task, "
                    "data, eval, strategies)")
    name = str(raw["name"])
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        ck.fail(raw, "name", f"study name {name!r} must be letters, digits, '-', '_' or '.'; "
                "rename it")
    task = str(raw["task"])
    if task not in TASKS:
        ck.fail(raw, "task", f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")

    # training data
    data_raw = raw["data"]
    if isinstance(data_raw, dict):
        ck.fields(data_raw, DATA_FIELDS, "data")
        if not data_raw.get("name"):
            ck.fail(raw, "data", "data needs a 'name' (a dataset preset or a local file)")
        data, fraction = str(data_raw["name"]), ck.number(data_raw, "fraction", "data",
                                                          minimum=0, exclusive=True)
        data_options = _plain(data_raw.get("options") or {})
    else:
        data, fraction, data_options = str(data_raw), None, {}

    # eval sets
    evals_raw = raw["eval"] if isinstance(raw["eval"], list) else [raw["eval"]]
    evals: list[EvalSet] = []
    for item in evals_raw:
        if isinstance(item, dict):
            ck.fields(item, EVAL_FIELDS, "an eval set")
            ename = str(item.get("name") or item.get("data") or "")
            if not ename:
                ck.fail(raw, "eval", "an eval set needs a 'name' (and optionally 'data')")
            max_ex = ck.number(item, "max_examples", f"eval set {ename}", kind=int, minimum=1)
            gen = item.get("generate")
            if gen is True:
                gen = {}
            elif gen in (None, False):
                gen = None
            else:
                ck.fields(gen, GENERATE_FIELDS, f"eval set {ename}: generate")
                for key in GENERATE_FIELDS:
                    if key not in ("java", "length_penalty"):
                        ck.number(gen, key, f"eval set {ename}: generate", kind=int, minimum=1)
                gen = _plain(gen)
            evals.append(EvalSet(name=ename, data=str(item.get("data") or ename),
                                 split=str(item.get("split") or "test"), max_examples=max_ex,
                                 options=_plain(item.get("options") or {}), generate=gen))
        else:
            evals.append(EvalSet(name=str(item), data=str(item)))
    names = [e.name for e in evals]
    if len(set(names)) != len(names):
        ck.fail(raw, "eval", f"eval set names must be unique, got {names}; give each a 'name'")

    # budget
    budget_raw = raw.get("budget") or {}
    ck.fields(budget_raw, BUDGET_FIELDS, "budget")
    budget: dict[str, Any] = {}
    for key in BUDGET_FIELDS:
        if key in _STR_BUDGET:
            if budget_raw.get(key) is not None:
                budget[key] = str(budget_raw[key])
            if key == "precision" and budget.get(key, "auto") not in PRECISIONS:
                ck.fail(budget_raw, key, f"unknown precision {budget[key]!r} in budget; use "
                        f"{', '.join(PRECISIONS)}")
            continue
        kind = int if key in _INT_BUDGET else float
        minimum, excl = (0, True) if key in ("epochs", "max_steps", "batch_size", "grad_accum",
                                             "seq_len", "lr") else (0, False)
        value = ck.number(budget_raw, key, "budget", kind=kind, minimum=minimum, exclusive=excl)
        if value is not None:
            budget[key] = value
    if "epochs" in budget and "max_steps" in budget:
        ck.fail(budget_raw, "epochs", "budget sets both 'epochs' and 'max_steps'; keep one")

    # seeds
    seeds_raw = raw.get("seeds", 1)
    if isinstance(seeds_raw, bool) or not (
            (isinstance(seeds_raw, int) and seeds_raw >= 1)
            or (isinstance(seeds_raw, list) and seeds_raw
                and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds_raw))):
        ck.fail(raw, "seeds", f"seeds must be a count >= 1 or a list of integers, got "
                f"{seeds_raw!r}")
    seeds = tuple(range(seeds_raw)) if isinstance(seeds_raw, int) else tuple(seeds_raw)
    if len(set(seeds)) != len(seeds):
        ck.fail(raw, "seeds", f"seeds repeat: {list(seeds)}; list each seed once")

    # strategies
    if not isinstance(raw["strategies"], list):
        ck.fail(raw, "strategies", "strategies must be a list of mappings")
    strategies: list[Strategy] = []
    for item in raw["strategies"]:
        ck.fields(item, STRATEGY_FIELDS, "a strategy")
        sname = str(item.get("name") or "")
        method = str(item.get("method") or "")
        if not sname:
            ck.fail(item, "method", "every strategy needs a 'name'")
        if not sname.replace("-", "").replace("_", "").replace(".", "").isalnum():
            ck.fail(item, "name", f"strategy name {sname!r} must be letters, digits, '-', '_' "
                    "or '.'")
        if method not in METHODS:
            ck.fail(item, "method" if "method" in item else "name",
                    f"strategy '{sname}': unknown method {method!r}; valid methods: "
                    f"{', '.join(METHODS)}")
        what = f"strategy '{sname}'"
        preset = item.get("preset")
        if preset is not None and str(preset) not in PRESETS:
            ck.fail(item, "preset", f"{what}: unknown preset {preset!r}; valid presets: "
                    f"{', '.join(PRESETS)} (or list module names under 'targets')")
        targets = item.get("targets")
        if targets is not None:
            targets = (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets)
        if preset is not None and targets is not None:
            ck.fail(item, "targets", f"{what}: set 'preset' or 'targets', not both")
        is_lora = method in ("lora", "lora-head", "qat-lora", "qlora", "lora-ptq")
        for key in ("preset", "targets", "rank", "alpha", "dropout", "rslora"):
            if item.get(key) is not None and not is_lora:
                ck.fail(item, key, f"{what}: '{key}' only applies to LoRA methods, not "
                        f"'{method}'; remove it")
        rank = ck.number(item, "rank", what, kind=int, minimum=1)
        alpha = ck.number(item, "alpha", what, minimum=0, exclusive=True)
        dropout = ck.number(item, "dropout", what, minimum=0)
        if dropout is not None and dropout >= 1:
            ck.fail(item, "dropout", f"{what}: dropout must be in [0, 1), got {dropout}")
        strategies.append(Strategy(
            name=sname, method=method, preset=None if preset is None else str(preset),
            targets=targets, rank=rank, alpha=alpha, dropout=dropout,
            lr=ck.number(item, "lr", what, minimum=0, exclusive=True),
            rslora=None if item.get("rslora") is None else bool(item["rslora"]),
            head_epochs=ck.number(item, "head_epochs", what, minimum=0, exclusive=True),
            epochs=ck.number(item, "epochs", what, minimum=0, exclusive=True),
            max_steps=ck.number(item, "max_steps", what, kind=int, minimum=1),
            options=_plain(item.get("options") or {})))
    snames = [s.name for s in strategies]
    if len(set(snames)) != len(snames):
        dup = next(n for n in snames if snames.count(n) > 1)
        ck.fail(raw, "strategies", f"strategy name '{dup}' appears twice; names must be unique")
    if not any(s.method == "none" for s in strategies):
        # The untuned model is always a row: the baseline every strategy has to beat.
        name0 = "untuned" if "untuned" not in snames else "untuned-model"
        strategies.insert(0, Strategy(name=name0, method="none"))

    # published numbers (rendered as labelled extra rows, never mixed with measurements)
    published = raw.get("published")
    if published is not None:
        ck.fields(published, PUBLISHED_FIELDS, "published")
        rows = published.get("rows")
        if not isinstance(rows, list) or not rows:
            ck.fail(published, "rows", "published needs 'rows': a list of {name, params, "
                    "metrics: {eval set: {metric: value}}}")
        for row in rows:
            ck.fields(row, PUBLISHED_ROW_FIELDS, "a published row")
            if not row.get("name") or not isinstance(row.get("metrics"), dict):
                ck.fail(published, "rows", "each published row needs 'name' and 'metrics'")
        published = _plain(published)

    train_options = raw.get("train_options") or {}
    if not isinstance(train_options, dict):
        ck.fail(raw, "train_options", "train_options must be a mapping of TrainConfig fields")
    num_labels = ck.number(raw, "num_labels", "the study", kind=int, minimum=2)
    report_to = None
    if raw.get("report_to") is not None:
        from loralab.training.tracking import parse_report_to

        try:
            report_to = parse_report_to(raw["report_to"])
        except UserError as exc:
            ck.fail(raw, "report_to", str(exc))
    return Study(name=name, model=str(raw["model"]), task=task, data=data,
                 data_fraction=fraction, data_options=data_options, eval=tuple(evals),
                 budget=budget, seeds=seeds, strategies=tuple(strategies), published=published,
                 train_options=_plain(train_options), num_labels=num_labels,
                 description=str(raw.get("description") or "").strip(), path=source,
                 raw=_plain(raw), report_to=report_to)


# ----------------------------------------------------------------------------- the run matrix
def with_seeds(study: Study, n: int | None) -> Study:
    """`--seeds N` overrides the study's seeds with 0..N-1."""
    if n is None:
        return study
    if n < 1:
        raise UserError(f"--seeds must be >= 1, got {n}; pass a positive count")
    return dataclasses.replace(study, seeds=tuple(range(n)))


def run_config(study: Study, strategy: Strategy, seed: int, run_dir: Path) -> dict[str, Any]:
    """The train config of one run, as a plain dict of TrainConfig-like fields.

    The budget is shared; a strategy may override lr/epochs/max_steps. The seed is the run's seed
    for every strategy, so every strategy sees the same data in the same order.
    """
    budget = dict(study.budget)
    other = {"epochs": "max_steps", "max_steps": "epochs"}  # a strategy's length replaces both
    for key in ("lr", "epochs", "max_steps"):
        value = getattr(strategy, key)
        if value is not None:
            if key in other:
                budget.pop(other[key], None)
            budget[key] = value
    config: dict[str, Any] = {
        "model": study.model, "task": study.task, "data": study.data,
        "eval_sets": [dataclasses.asdict(e) for e in study.eval],
        "method": strategy.method, "seed": seed, "out": str(run_dir),
        "strategy": strategy.name, "study": study.name,
    }
    if study.data_fraction is not None:
        config["data_fraction"] = study.data_fraction
    if study.data_options:
        config["data_options"] = study.data_options
    if study.num_labels is not None:
        config["num_labels"] = study.num_labels
    config.update(budget)
    for key in ("preset", "rank", "alpha", "dropout", "rslora", "head_epochs"):
        value = getattr(strategy, key)
        if value is not None:
            config[key] = value
    if strategy.targets is not None:  # TrainConfig.preset takes comma-separated module names
        config["preset"] = ",".join(strategy.targets)
    config.update(study.train_options)
    config.update(strategy.options)
    # where results are reported (outside the config hash): W&B groups and the MLflow
    # experiment by study, one MLflow store in the study's output directory (OUT/runs/RUN)
    config.update(tracking_group=study.name, tracking_dir=str(run_dir.parent.parent))
    if study.report_to is not None:
        config["report_to"] = list(study.report_to)
    return config


def run_matrix(study: Study, out_dir: Path, *, native_bf16: bool | None = None
               ) -> list[RunSpec]:
    """All runs of the study, seed-major so a partial study already covers every strategy.
    Precision auto is resolved for this machine (`pin_precision`)."""
    specs = []
    for seed in study.seeds:
        for strategy in study.strategies:
            run_dir = Path(out_dir) / "runs" / f"{strategy.name}-seed{seed}"
            config = pin_precision(run_config(study, strategy, seed, run_dir), native_bf16)
            specs.append(RunSpec(run_id=f"{study.name}/{strategy.name}/seed{seed}",
                                 strategy=strategy.name, seed=seed, run_dir=run_dir,
                                 config=config))
    return specs


def pin_precision(config: dict[str, Any], native_bf16: bool | None = None) -> dict[str, Any]:
    """A run config with precision auto (the default) replaced by what it computes in on the
    device `train` picks (`train.resolve_precision`; `native_bf16` overrides the machine's
    answer), so the config hash, which decides whether a finished run is reused, names the
    computation: a bf16 run on an AMX machine is not the fp32 run of an AVX2 one. fp32 stays
    implicit where the study names no precision: that is what such a config meant before auto
    existed, so existing studies keep their hashes (and finished runs) where bf16 is not
    native, and train again, in bf16, only where it is."""
    if config.get("precision", "auto") != "auto":
        return config
    import torch

    from loralab.training.precision import resolve_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = resolve_precision("auto", device, native_bf16=native_bf16)
    if resolved == "fp32" and "precision" not in config:
        return config
    return {**config, "precision": resolved}


def study_summary(study: Study) -> dict[str, Any]:
    """What the report shows as "the study": the validated file, with the untuned row added."""
    raw = dict(study.raw)
    raw["seeds"] = list(study.seeds)
    raw["budget"] = dict(study.budget)
    raw["strategies"] = [{k: v for k, v in dataclasses.asdict(s).items() if v not in (None, {})}
                         for s in study.strategies]
    return raw


# ----------------------------------------------------------------------------- running
def _has_checkpoints(run_dir: Path) -> bool:
    ckpt = run_dir / "checkpoints"
    return ckpt.is_dir() and any(ckpt.iterdir())


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "record.json").read_text())
    except (OSError, ValueError):
        return None


def _stored_hash(run_dir: Path) -> str | None:
    try:
        return config_hash(json.loads((run_dir / "study_config.json").read_text()))
    except (OSError, ValueError):
        return None


def plan(study: Study, out_dir: Path, db) -> Iterator[tuple[RunSpec, str]]:
    """Yield (spec, action): action is 'skip' (finished, same config), 'ingest' (record.json
    says finished but the process died before the database heard of it), 'resume' (checkpoints
    of the same config exist, or a finished record lacks the study's own evaluation) or
    'train'."""
    for spec in run_matrix(study, out_dir):
        row = db.get(spec.run_id)
        if row and row["status"] == "finished" and row.get("config_hash") == spec.config_hash:
            yield spec, "skip"
            continue
        same = _stored_hash(spec.run_dir) == spec.config_hash
        record = _read_record(spec.run_dir)
        finished = same and record is not None and record.get("status") == "finished"
        if finished and _record_complete(record, spec.config):
            yield spec, "ingest"
        elif finished or (same and _has_checkpoints(spec.run_dir)):
            # trained, but killed before the study's own evaluation (generation) was added:
            # train(resume=True) returns the finished record and the evaluation runs again
            yield spec, "resume"
        else:
            yield spec, "train"


def _record_complete(record: dict[str, Any], config: dict[str, Any]) -> bool:
    """Does a finished record hold every eval set (and its generation scores, if asked)?"""
    metrics = record.get("metrics") or {}
    for ev in config.get("eval_sets", []):
        if ev["name"] not in metrics:
            return False
        if ev.get("generate") is not None and "generated" not in metrics[ev["name"]]:
            return False
    return True


def _prepare_run_dir(spec: RunSpec) -> None:
    """Write the run's study config first, so a later resume knows what it belongs to. Whatever
    an earlier attempt left (another config, or a run killed before its first checkpoint) is
    kept, renamed aside, never deleted."""
    if spec.run_dir.exists() and any(spec.run_dir.iterdir()):
        aside = spec.run_dir.with_name(f"{spec.run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(spec.run_dir, aside)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(spec.run_dir / "study_config.json", spec.config)


# Study-config keys that are the study's business, not TrainConfig fields.
_STUDY_ONLY = ("strategy", "study", "eval_sets", "eval_max_examples", "data_options")


def to_train_config(config: dict[str, Any]):
    """A study run config -> `train.TrainConfig`. A setting TrainConfig does not know is a
    UserError (silently dropping, say, `dropout` would make a study measure something other
    than what it says)."""
    from loralab.training.config import make_config

    return make_config({k: v for k, v in config.items() if k not in _STUDY_ONLY})


def build_task_data(config: dict[str, Any], tokenizer):
    """The run's data with the study's evaluation sets as extra splits.

    `train.train` evaluates every non-train split of the data it is given, so each eval set
    becomes a split named after it: the training set's own held-out split (test, else
    validation) or the test split of another preset, tokenised with the same tokenizer and
    seq_len, subsampled to max_examples (the same examples for every run). The validation split
    (for the validation-loss curve and best-checkpoint choice) is subsampled to
    eval_max_examples."""
    from loralab.data.tasks import load_task_data

    common = {"seq_len": config.get("seq_len", 128), "seed": config.get("seed", 0)}
    base = load_task_data(config["data"], config["task"], tokenizer,
                          data_fraction=config.get("data_fraction", 1.0),
                          **common, **config.get("data_options", {}))
    default_n = config.get("eval_max_examples")
    splits = {"train": base.splits["train"]} if "train" in base.splits else {}
    if "validation" in base.splits:
        splits["validation"] = subsample(base.splits["validation"], default_n)
    for ev in config.get("eval_sets", []):
        n = ev.get("max_examples") or default_n
        if ev["data"] == config["data"] and not ev.get("options"):
            source = base
        else:
            options = dict(ev.get("options", {}))
            if ev["data"] == config["data"]:
                options = {**config.get("data_options", {}), **options}
            source = load_task_data(ev["data"], config["task"], tokenizer, **common, **options)
        split = ev.get("split") or "test"
        if split not in source.splits:
            fallback = next((s for s in ("test", "validation") if s in source.splits), None)
            if fallback is None:
                raise UserError(f"eval set '{ev['name']}': dataset {ev['data']} has no "
                                f"'{split}' split (splits: {', '.join(source.splits)}); set "
                                "'split' in the study")
            split = fallback
        splits[ev["name"]] = subsample(source.splits[split], n)
    return dataclasses.replace(base, splits=splits)


def default_run_fn(config: dict[str, Any], resume: bool) -> dict[str, Any]:
    """Train one run with `loralab.training.loop.train` (imported lazily: it pulls in torch), on data
    built by `build_task_data` so the record's metrics are keyed by the study's eval sets."""
    from loralab.training import loop as train_mod
    from loralab.training.checkpoint import seed_everything
    from loralab.models.loading import load_model

    tc = to_train_config(config)
    t0 = time.perf_counter()
    # Seed before loading, as train() does when it loads the model itself: a newly initialised
    # head (a classifier) must depend on the run's seed only, not on what earlier runs of the
    # study drew from the global RNG (else strategies of one seed start from different heads).
    seed_everything(tc.seed)
    loaded = load_model(tc.model, tc.task, num_labels=tc.num_labels)
    t1 = time.perf_counter()
    task_data = build_task_data(config, loaded.tokenizer)
    load_seconds, data_seconds = t1 - t0, time.perf_counter() - t1
    finished_before = resume and (_read_record(Path(tc.out)) or {}).get("status") == "finished"
    record = train_mod.train(tc, resume=resume, loaded=loaded, task_data=task_data)
    if not finished_before:  # model loading and data preparation, reported apart from training
        record.setdefault("costs", {}).update({
            "load_seconds": load_seconds, "data_seconds": data_seconds,
            "data_from_cache": bool(getattr(task_data, "from_cache", False))})
        if (Path(tc.out) / "record.json").exists():
            _write_json(Path(tc.out) / "record.json", record)
    gens = [e for e in config.get("eval_sets", []) if e.get("generate") is not None]
    if gens and record.get("status") == "finished":
        # train() returns a finished record without training: use the saved weights instead;
        # quantized methods record another model than the one trained (load_run_model)
        model, tokenizer = loaded.model, loaded.tokenizer
        if finished_before or tc.method in ("qat-lora", "qlora", "lora-ptq"):
            model, tokenizer, _ = load_run_model(tc.out)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        from loralab.scoring.generations import FILENAME

        (Path(tc.out) / FILENAME).unlink(missing_ok=True)  # generation_scores appends to it
        scored: dict[str, dict[str, Any]] = {}
        for ev in gens:
            scores = generation_scores(model, tokenizer, task_data, ev, config, timings=timings)
            record["metrics"].setdefault(ev["name"], {}).update(scores)
            scored[ev["name"]] = scores
        record["costs"]["generation_seconds"] = time.perf_counter() - t0
        record["costs"].update(timings)  # decode_seconds, score_seconds
        from loralab.training.tracking import final_values, report_final

        # train() closed the trackers before these existed: add them to the same runs
        late = final_values(scored, {k: record["costs"][k]
                                     for k in ["generation_seconds", *timings]})
        record.setdefault("notes", []).extend(report_final(record, late))
        _write_json(Path(tc.out) / "record.json", record)
    return record


def generation_prompts(tokenizer, task_data, ev: dict[str, Any], config: dict[str, Any]
                       ) -> list[tuple[str | list[int], list[str]]]:
    """(prompt, references) pairs of an eval set, at most max_examples of them.

    task `generate`: the split's distinct sources in the training format ("source =") with all
    their references. Other tasks: held-out blocks, the first `prompt_tokens` token ids as the
    prompt (ids, not text: no decode/re-encode round trip) and the rest decoded as reference."""
    gen = ev.get("generate") or {}
    n = gen.get("max_examples") or ev.get("max_examples") or 50
    if config["task"] == "generate":
        if not task_data.refs:
            raise UserError(f"eval set '{ev['name']}' has no references to score generations "
                            "against; remove 'generate' from it")
        split = ev.get("split") or "test"
        return list(task_data.references(split if split in task_data.refs else next(iter(
            task_data.refs))))[:n]
    k = int(gen.get("prompt_tokens") or 32)
    pairs: list[tuple[str | list[int], list[str]]] = []
    for ids in task_data.splits[ev["name"]]["input_ids"][:n]:
        if len(ids) > k + 4:
            pairs.append((list(ids[:k]), [tokenizer.decode(ids[k:])]))
    return pairs


def decode_config(gen: dict[str, Any]):
    """The study's `generate:` options as a `loralab.scoring.decode.DecodeConfig`. Defaults are greedy
    (beam 1, length penalty 1, no n-gram blocking, 48 new tokens); a study that wants the LoRA
    paper's beam search says so (num_beams: 10, length_penalty: 0.8, no_repeat_ngram_size: 4)."""
    from loralab.scoring.decode import DecodeConfig

    return DecodeConfig(num_beams=int(gen.get("num_beams") or 1),
                        length_penalty=float(gen.get("length_penalty", 1.0)),
                        no_repeat_ngram_size=int(gen.get("no_repeat_ngram_size") or 0),
                        max_new_tokens=int(gen.get("max_new_tokens") or 48))


def generate_hypotheses(model, tokenizer, prompts: list[str | list[int]], task: str,
                        gen: dict[str, Any], *, batch_size: int = 8,
                        progress: str | None = None) -> list[str]:
    """Decode the prompts with `loralab.scoring.decode.generate_texts` (left-padded batches, stop at
    EOS; batched decoding gives the same tokens as one prompt at a time). For `generate` the
    hypothesis is the first line of the output (one sentence per MR, as the E2E scripts read
    it)."""
    from loralab.scoring.decode import generate_texts

    texts = generate_texts(model, tokenizer, prompts, config=decode_config(gen),
                           batch_size=batch_size, progress=progress)
    if task == "generate":
        texts = [t.split("\n")[0].strip() for t in texts]
    return texts


def generation_scores(model, tokenizer, task_data, ev: dict[str, Any], config: dict[str, Any],
                      *, timings: dict[str, float] | None = None) -> dict[str, float]:
    """Decode the eval set's prompts and score them against its references with the E2E
    scorers (loralab.scoring.e2e): mteval BLEU/NIST, METEOR, ROUGE_L, CIDEr (when Java is
    installed), sacreBLEU, chrF, TER, ROUGE-1/2/L. `timings` (if given) accumulates
    decode_seconds and score_seconds, the two costs of a generation evaluation. The texts are
    appended to RUN/generations.jsonl (loralab.scoring.generations) when the config names its run."""
    import shutil

    from loralab.scoring import e2e as e2e_metrics

    gen = ev.get("generate") or {}
    pairs = generation_prompts(tokenizer, task_data, ev, config)
    if not pairs:
        raise UserError(f"eval set '{ev['name']}': no examples to generate from")
    t0 = time.perf_counter()
    hyps = generate_hypotheses(model, tokenizer, [p for p, _ in pairs], config["task"], gen,
                               progress=f"decoding, {ev['name']}")
    t1 = time.perf_counter()
    java = bool(gen.get("java", True)) and shutil.which("java") is not None
    refs = [r for _, r in pairs]
    hyps = [h if h.strip() else "." for h in hyps]  # an empty output still counts, as a miss
    if config.get("out"):  # kept for reading and rescoring (`loralab score --generations`)
        from loralab.scoring.generations import FILENAME, append_generations

        append_generations(Path(config["out"]) / FILENAME, ev["name"], ev.get("split") or "test",
                           [p for p, _ in pairs], refs, hyps, tokenizer)
    scores = e2e_metrics.score_e2e(refs, hyps, java=java, progress=f"scoring, {ev['name']}")
    if timings is not None:
        timings["decode_seconds"] = timings.get("decode_seconds", 0.0) + t1 - t0
        timings["score_seconds"] = (timings.get("score_seconds", 0.0)
                                    + time.perf_counter() - t1)
    scores["generated"] = len(hyps)
    return {k: float(v) for k, v in scores.items()}


def check_configs(study: Study, out_dir: Path) -> None:
    """Fail before any training if a run's settings are not valid TrainConfig fields."""
    for spec in run_matrix(study, out_dir):
        to_train_config(spec.config)


def run_study(study: Study, out_dir: str | os.PathLike, *, run_fn: RunFn | None = None,
              progress: Callable[[str], None] = print, db=None,
              bar: bool = False) -> list[dict[str, Any]]:
    """Run every missing run of the study; return the rows of all its runs. `bar`: also show
    the runs done of those to run, with the elapsed time, on stderr (`loralab.progress`: a
    bar on a terminal, a plain line after each run otherwise).

    Each run's row goes `running` -> `finished` | `failed`; an interrupted run stays `running`
    (or `interrupted`) and is resumed next time. A failed run does not stop the study; a
    UserError (bad config) does, since every other run would fail the same way.
    """
    from loralab.results.database import ResultsDB

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if run_fn is None:
        check_configs(study, out_dir)
        run_fn = default_run_fn
    own_db = db is None
    db = db or ResultsDB(out_dir / "results.sqlite")
    try:
        db.save_study(study.name, study_summary(study), study.path)
        actions = list(plan(study, out_dir, db))
        todo = sum(a != "skip" for _, a in actions)
        progress(f"study '{study.name}': {len(actions)} runs ({len(study.strategies)} strategies"
                 f" x {len(study.seeds)} seeds), {len(actions) - todo} finished, {todo} to run;"
                 f" output {out_dir}")
        from loralab.progress import Progress

        t_study = time.perf_counter()
        shown = Progress(f"study {study.name}", todo, "run", "runs", enabled=bar and todo > 0,
                         lines=todo)
        for i, (spec, action) in enumerate(actions, 1):
            head = f"[{i}/{len(actions)}] {spec.strategy} seed {spec.seed}"
            if action == "skip":
                progress(f"{head}: finished earlier, skipped")
                continue
            if action == "ingest":
                record = _read_record(spec.run_dir) or {}
                db.record_run(spec, record, status="finished")
                progress(f"{head}: finished earlier (record.json), added to the database")
                shown.update()
                continue
            progress(f"{head}: {'resuming from checkpoint' if action == 'resume' else 'training'}"
                     f" ({_describe(spec.config)}) ...")
            if action == "train":
                _prepare_run_dir(spec)
            db.start_run(spec, study.name)
            t0 = time.perf_counter()
            try:
                record = run_fn(spec.config, action == "resume")
            except UserError as exc:
                db.set_status(spec.run_id, "failed", error=f"{type(exc).__name__}: {exc}")
                if type(exc).__name__ != "TrainingDiverged":  # a NaN is this run's problem
                    raise
                progress(f"{head}: FAILED: {exc}")
                shown.update()
                continue
            except KeyboardInterrupt:
                db.set_status(spec.run_id, "interrupted")
                raise
            except Exception as exc:  # one failed run must not sink the study
                msg = f"{type(exc).__name__}: {exc}"
                db.set_status(spec.run_id, "failed", error=msg,
                              traceback_text=traceback.format_exc())
                progress(f"{head}: FAILED after {time.perf_counter() - t0:.0f} s: {msg}")
                shown.update()
                continue
            record = dict(record or {})
            status = record.get("status") or "finished"
            db.record_run(spec, record, status=status)
            progress(f"{head}: {status} in {time.perf_counter() - t0:.0f} s"
                     f"{_headline(record)}")
            shown.update()
        shown.close()
        progress(f"study '{study.name}' done in {time.perf_counter() - t_study:.0f} s")
        return db.list_runs(study=study.name)
    finally:
        if own_db:
            db.close()


def _describe(config: dict[str, Any]) -> str:
    parts = [config["method"]]
    for key in ("preset", "rank", "alpha", "lr", "max_steps", "epochs"):
        if config.get(key) is not None:
            parts.append(f"{key}={config[key]}")
    return ", ".join(parts)


def _headline(record: dict[str, Any]) -> str:
    bits = []
    for set_name, metrics in (record.get("metrics") or {}).items():
        if not isinstance(metrics, dict):
            continue
        for key in ("perplexity", "f1", "accuracy", "bleu"):
            if isinstance(metrics.get(key), (int, float)):
                bits.append(f"{set_name} {key} {metrics[key]:.4g}")
                break
    return (": " + ", ".join(bits)) if bits else ""


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- using a run
def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run directory's record (record.json), with its study config when present."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}; pass a directory under "
                        "<study out>/runs/ (see `loralab runs`)")
    record = _read_record(run_dir)
    if record is None:
        raise UserError(f"{run_dir} has no readable record.json; the run did not finish: "
                        "re-run `loralab compare` on its study")
    try:
        record["study_config"] = json.loads((run_dir / "study_config.json").read_text())
    except (OSError, ValueError):
        record.setdefault("study_config", {})
    return record


def _resolve_artifact(run_dir: Path, path: str | None) -> Path | None:
    if not path:
        return None
    p = Path(path)
    for cand in (p, run_dir / p, run_dir / p.name):
        if cand.exists():
            return cand
    return None


def _run_scheme(record: dict[str, Any], cfg: dict[str, Any]) -> str | None:
    """A run's quantization scheme: its config's `quant`, else its record's quant section."""
    return cfg.get("quant") or (record.get("quant") or {}).get("scheme")


def load_run_model(run_dir: str | os.PathLike):
    """(model, tokenizer, record) of a run: exactly the model whose metrics the run recorded.
    Its saved model (full), the base with its head (head) or the base with its adapter, rebuilt
    per method by `quant.rebuild_recorded`: W + s B A (lora, lora-head), Q(W) + s B A (qlora),
    the merged quantized Q(W + s B A) (qat-lora, lora-ptq)."""
    from loralab.models.loading import load_model

    run_dir = Path(run_dir)
    record = load_run(run_dir)
    cfg = {**(record.get("config") or {}), **record["study_config"]}
    if not cfg.get("model") or not cfg.get("task"):
        raise UserError(f"{run_dir}/record.json names no model or task; it is not a loralab run")
    task = str(cfg["task"])
    kwargs = {"num_labels": int(cfg["num_labels"])} if cfg.get("num_labels") else {}
    arts = record.get("artifacts") or {}
    saved = _resolve_artifact(run_dir, arts.get("model"))
    adapter = _resolve_artifact(run_dir, arts.get("adapter"))
    if saved is not None:
        loaded = load_model(str(saved), task, **kwargs)
    else:
        loaded = load_model(str(cfg["model"]), task, **kwargs)
        head = _resolve_artifact(run_dir, arts.get("head"))
        if adapter is not None:  # the model the run recorded: W + s B A, Q(W) + s B A, ...
            from loralab.quant.core import rebuild_recorded

            rebuild_recorded(loaded.model, str(cfg.get("method") or "lora"),
                             _run_scheme(record, cfg), adapter)
        elif head is not None:  # head-only runs save every head module's tensors
            from loralab.models.loading import load_head_file

            load_head_file(loaded.model, head / "head.safetensors")
        elif cfg.get("method") not in (None, "none"):
            raise UserError(f"run {run_dir} saved neither a model nor an adapter; re-run it")
    loaded.model.eval()
    return loaded.model, loaded.tokenizer, record


def merge_run(run_dir: str | os.PathLike, out: str | os.PathLike, *,
              note: Callable[[str], None] | None = None) -> Path:
    """Write the run's model with its adapters folded in (W + (alpha/r) B A) as a plain
    transformers model (save_pretrained + tokenizer), ready for serving without loralab.
    Quantized runs (qlora, qat-lora, lora-ptq) write the float form of the model they recorded
    (`quant.float_export`: dequant(Q(W)) + s B A, or dequant(Q(W + s B A))), told via `note`."""
    from loralab.lora.layer import has_lora, merge_lora
    from loralab.quant.core import QUANT_METHODS, float_export

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; pass a new --out directory")
    model, tokenizer, record = load_run_model(run_dir)
    cfg = {**(record.get("config") or {}), **record["study_config"]}
    if cfg.get("method") in QUANT_METHODS:
        model, message = float_export(model, str(cfg["method"]), str(_run_scheme(record, cfg)))
        if note is not None:
            note(message)
    elif has_lora(model):
        model = merge_lora(model)
    tmp = out.with_name(out.name + ".tmp-merge")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def generate_from_run(run_dir: str | os.PathLike, prompts: list[str], *,
                      max_new_tokens: int = 40, temperature: float = 0.8, top_p: float = 0.95,
                      seed: int = 0) -> list[str]:
    """Sample a continuation per prompt (lm/generate runs) or, for a classifier, return the
    predicted label with its probability."""
    import torch

    model, tokenizer, record = load_run_model(run_dir)
    cfg = {**(record.get("config") or {}), **record["study_config"]}
    torch.manual_seed(seed)
    if cfg.get("task") == "classify":
        out = []
        with torch.no_grad():
            for text in prompts:
                enc = tokenizer(text, return_tensors="pt", truncation=True)
                probs = model(**enc).logits.softmax(-1)[0]
                label = int(probs.argmax())
                out.append(f"label {label} (p={float(probs[label]):.3f})")
        return out
    out = []
    with torch.no_grad():
        for text in prompts:
            enc = tokenizer(text, return_tensors="pt")
            ids = model.generate(**enc, max_new_tokens=max_new_tokens,
                                 do_sample=temperature > 0, temperature=temperature or None,
                                 top_p=top_p if temperature > 0 else None,
                                 pad_token_id=tokenizer.pad_token_id)
            out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:],
                                        skip_special_tokens=True))
    return out
