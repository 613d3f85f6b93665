"""The study file: its YAML, its dataclasses (`Study`, `Strategy`, `EvalSet`), parsing and checks.

A study fixes everything but the fine-tuning strategy: one model, one task, one training set,
one or more evaluation sets and one budget (steps or epochs, batch, sequence length, learning
rate). Every strategy trains on the same data in the same order (the data order depends only on
the seed, and every strategy of a seed gets the same seed), so differences between rows come
from the strategy alone. The untuned model (the registry's method that does not train, `none`)
is always a row: it is the baseline every other row has to beat.

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

Every error names `file:line` (or the command-line override that set the value). The keys of
`budget`, a strategy, `train_options` and a strategy's `options` are `TrainConfig` fields: their
types come from `loralab.training.config.field_kinds`, and `plan.check_configs` builds each
run's TrainConfig, whose validator has the last word (its `ConfigError.key` names the line).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from loralab.errors import ConfigError, UserError
from loralab.lora.targets import PRESETS
from loralab.study.lines import load_yaml, location, plain
from loralab.study.overrides import apply_overrides
from loralab.training.config import CHOICES, TASKS, field_kinds, parse_report_to, peft_methods
from loralab.training.strategies import registry
from loralab.training.strategies.peft import check_mapping

STUDY_FIELDS = ("name", "description", "model", "task", "data", "eval", "budget", "seeds",
                "strategies", "published", "train_options", "num_labels", "report_to")
DATA_FIELDS = ("name", "fraction", "options")
EVAL_FIELDS = ("name", "data", "split", "max_examples", "options", "generate")
GENERATE_FIELDS = ("max_examples", "max_new_tokens", "num_beams", "length_penalty",
                   "no_repeat_ngram_size", "prompt_tokens", "java")
BUDGET_FIELDS = ("epochs", "max_steps", "batch_size", "grad_accum", "seq_len", "lr",
                 "warmup_steps", "warmup_ratio", "weight_decay", "label_smoothing", "schedule",
                 "grad_clip", "precision", "eval_every", "eval_batches", "eval_max_examples")
"""The TrainConfig fields a study's shared budget may set (anything else: `train_options`)."""
_POSITIVE_BUDGET = ("epochs", "max_steps", "batch_size", "grad_accum", "seq_len", "lr")
LORA_FIELDS = ("preset", "targets", "rank", "alpha", "dropout", "rslora", "dora", "init",
               "lr_ratio")
"""Strategy fields that apply to LoRA methods only (registry `uses_lora`)."""
STRATEGY_FIELDS = ("name", "method", *LORA_FIELDS, "lr", "head_epochs", "epochs", "max_steps",
                   "peft", "options")
PUBLISHED_FIELDS = ("source", "note", "rows")
PUBLISHED_ROW_FIELDS = ("name", "params", "metrics")

_KINDS = field_kinds()
assert (set(BUDGET_FIELDS) | set(STRATEGY_FIELDS)) - {"name", "targets", "options"} \
    <= set(_KINDS), "study keys must be TrainConfig fields"


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
    """One row of the study: a fine-tuning method with its hyper-parameters (None: the
    budget's value, else TrainConfig's default)."""

    name: str
    method: str
    preset: str | None = None
    targets: tuple[str, ...] | None = None
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    lr: float | None = None
    rslora: bool | None = None
    dora: bool | None = None
    init: str | None = None
    lr_ratio: float | None = None
    head_epochs: float | None = None
    epochs: float | None = None
    max_steps: int | None = None
    peft: dict[str, Any] | None = None
    """Method peft: PEFT's config mapping (TrainConfig `peft`; `type:` picks the PEFT type)."""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Study:
    """A validated study file. `budget` holds typed TrainConfig values shared by every run."""

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
    """Trackers of every run (loralab.training.tracking; None: TrainConfig's default,
    TensorBoard)."""
    locations: dict[str, dict[str, str]] = field(default_factory=dict, compare=False,
                                                 repr=False)
    """strategy name -> TrainConfig key -> where its value was set (`file:line` or the
    override), for the errors of `plan.check_configs`."""


# ----------------------------------------------------------------------------- checks
class _Checker:
    """Raises UserError `file:line: message` for a key of a line-numbered mapping."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: Any, key: str | None, msg: str) -> NoReturn:
        raise UserError(f"{location(self.source, where, key)}: {msg}")

    def fields(self, obj: Any, valid: tuple[str, ...], what: str) -> dict:
        """`obj` must be a mapping whose keys are all in `valid`."""
        if not isinstance(obj, dict):
            self.fail(None, None, f"{what} must be a mapping (key: value), got "
                      f"{type(obj).__name__}; valid fields: {', '.join(valid)}")
        for key in obj:
            if key not in valid:
                self.fail(obj, key, f"unknown field '{key}' in {what}; valid fields: "
                          f"{', '.join(valid)}")
        return obj

    def number(self, obj: dict, key: str, what: str, *, kind: type = float,
               minimum: float | None = None, exclusive: bool = False) -> Any:
        """`obj[key]` as `kind` (int or float; None if absent), at least (or, `exclusive`,
        above) `minimum`. YAML 1.1 reads "2e-4" as a string: such strings are numbers too."""
        value: Any = obj.get(key)
        if value is None:
            return None
        if isinstance(value, str):
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
            self.fail(obj, key, f"{what} '{key}' must be "
                      f"{'an integer' if kind is int else 'a number'}{bound}, got {value!r}; "
                      "fix the value")
        return kind(value)

    def train_value(self, obj: dict, key: str, what: str, *, minimum: float | None = 0,
                    exclusive: bool = False) -> Any:
        """A TrainConfig field's value in its field's type (`field_kinds`): numbers checked
        by `number`, choices (precision, schedule, ...) against `CHOICES`, strings as str."""
        value = obj.get(key)
        kind = _KINDS[key][0]
        if value is None or kind is tuple:
            return value
        if kind in (int, float):
            return self.number(obj, key, what, kind=kind, minimum=minimum, exclusive=exclusive)
        if kind is bool:
            return bool(value)
        if key in CHOICES and str(value) not in CHOICES[key]:
            self.fail(obj, key, f"unknown {key} {str(value)!r} in {what}; use "
                      f"{', '.join(CHOICES[key])}")
        return str(value)


def baseline_method() -> str:
    """The registry's method that trains nothing (`none`): the untuned baseline row."""
    return next(n for n in registry.names() if not registry.get_spec(n).trains)


def _valid_name(name: str) -> bool:
    return name.replace("-", "").replace("_", "").replace(".", "").isalnum()


# ----------------------------------------------------------------------------- finding files
def resolve_study_path(spec: str | os.PathLike | None) -> Path:
    """A study argument -> a file: a path, or the name of a bundled study (`default`,
    `gpt2-wikitext2-offline`, ...). No argument means the bundled `default` study.
    Raises UserError naming the bundled studies when neither exists."""
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
    """The study files shipped inside the package (`loralab/studies/*.yaml`), by name."""
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


# ----------------------------------------------------------------------------- parsing
def parse_study(text: str, source: str = "<study>",
                overrides: tuple[str, ...] | list[str] = ()) -> Study:
    """A study's YAML text (+ command-line overrides) -> a validated `Study`, with the untuned
    baseline row added when the file has none. Raises UserError `source:line: ...`."""
    raw = load_yaml(text, source)
    ck = _Checker(source)
    if not isinstance(raw, dict):
        ck.fail(None, None, "a study file must be a YAML mapping with fields "
                f"{', '.join(STUDY_FIELDS)}")
    if overrides:
        raw = apply_overrides(raw, overrides)
    name, task = _parse_head(ck, raw)
    data, fraction, data_options = _parse_data(ck, raw)
    evals, budget = _parse_evals(ck, raw), _parse_budget(ck, raw)
    seeds, strategies = _parse_seeds(ck, raw), _parse_strategies(ck, raw)
    published = _parse_published(ck, raw)
    train_options = raw.get("train_options") or {}
    if not isinstance(train_options, dict):
        ck.fail(raw, "train_options", "train_options must be a mapping of TrainConfig fields")
    study = Study(name=name, model=str(raw["model"]), task=task, data=data,
                  data_fraction=fraction, data_options=data_options, eval=evals, budget=budget,
                  seeds=seeds, strategies=strategies, published=published,
                  train_options=plain(train_options),
                  num_labels=ck.number(raw, "num_labels", "the study", kind=int, minimum=2),
                  description=str(raw.get("description") or "").strip(), path=source,
                  raw=plain(raw), report_to=_parse_report_to(ck, raw))
    return dataclasses.replace(study, locations=_locations(ck, raw, study))


def _parse_head(ck: _Checker, raw: dict) -> tuple[str, str]:
    """Known fields, required fields present, a usable name and a known task."""
    ck.fields(raw, STUDY_FIELDS, "the study")
    for key in ("name", "model", "task", "data", "eval", "strategies"):
        if raw.get(key) in (None, "", []):
            ck.fail(None, None, f"missing field '{key}'; add it (required: name, model, task, "
                    "data, eval, strategies)")
    name = str(raw["name"])
    if not _valid_name(name):
        ck.fail(raw, "name", f"study name {name!r} must be letters, digits, '-', '_' or '.'; "
                "rename it")
    task = str(raw["task"])
    if task not in TASKS:
        ck.fail(raw, "task", f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return name, task


def _parse_data(ck: _Checker, raw: dict) -> tuple[str, float | None, dict[str, Any]]:
    """The training set: a name, or {name, fraction, options}."""
    data_raw = raw["data"]
    if not isinstance(data_raw, dict):
        return str(data_raw), None, {}
    ck.fields(data_raw, DATA_FIELDS, "data")
    if not data_raw.get("name"):
        ck.fail(raw, "data", "data needs a 'name' (a dataset preset or a local file)")
    fraction = ck.number(data_raw, "fraction", "data", minimum=0, exclusive=True)
    return str(data_raw["name"]), fraction, plain(data_raw.get("options") or {})


def _parse_generate(ck: _Checker, gen: Any, what: str) -> dict[str, Any] | None:
    """An eval set's `generate`: true ({}), false/absent (None) or a mapping of options."""
    if gen is True:
        return {}
    if gen in (None, False):
        return None
    ck.fields(gen, GENERATE_FIELDS, what)
    for key in GENERATE_FIELDS:
        if key not in ("java", "length_penalty"):
            ck.number(gen, key, what, kind=int, minimum=1)
    return plain(gen)


def _parse_evals(ck: _Checker, raw: dict) -> tuple[EvalSet, ...]:
    """The evaluation sets: names, or mappings of EVAL_FIELDS; names must be unique."""
    evals: list[EvalSet] = []
    for item in raw["eval"] if isinstance(raw["eval"], list) else [raw["eval"]]:
        if not isinstance(item, dict):
            evals.append(EvalSet(name=str(item), data=str(item)))
            continue
        ck.fields(item, EVAL_FIELDS, "an eval set")
        name = str(item.get("name") or item.get("data") or "")
        if not name:
            ck.fail(raw, "eval", "an eval set needs a 'name' (and optionally 'data')")
        max_ex = ck.number(item, "max_examples", f"eval set {name}", kind=int, minimum=1)
        gen = _parse_generate(ck, item.get("generate"), f"eval set {name}: generate")
        evals.append(EvalSet(name=name, data=str(item.get("data") or name),
                             split=str(item.get("split") or "test"), max_examples=max_ex,
                             options=plain(item.get("options") or {}), generate=gen))
    names = [e.name for e in evals]
    if len(set(names)) != len(names):
        ck.fail(raw, "eval", f"eval set names must be unique, got {names}; give each a 'name'")
    return tuple(evals)


def _parse_budget(ck: _Checker, raw: dict) -> dict[str, Any]:
    """The shared budget: TrainConfig values in their field's type, epochs or max_steps."""
    budget_raw = raw.get("budget") or {}
    ck.fields(budget_raw, BUDGET_FIELDS, "budget")
    budget: dict[str, Any] = {}
    for key in BUDGET_FIELDS:
        value = ck.train_value(budget_raw, key, "budget", minimum=0,
                               exclusive=key in _POSITIVE_BUDGET)
        if value is not None:
            budget[key] = value
    if "epochs" in budget and "max_steps" in budget:
        ck.fail(budget_raw, "epochs", "budget sets both 'epochs' and 'max_steps'; keep one")
    return budget


def _parse_seeds(ck: _Checker, raw: dict) -> tuple[int, ...]:
    """`seeds: N` (0..N-1) or a list of distinct integers."""
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
    return seeds


def _parse_strategy(ck: _Checker, item: Any) -> Strategy:
    """One strategy mapping: a name, a registry method, LoRA keys only for LoRA methods."""
    ck.fields(item, STRATEGY_FIELDS, "a strategy")
    name, method = str(item.get("name") or ""), str(item.get("method") or "")
    if not name:
        ck.fail(item, "method", "every strategy needs a 'name'")
    if not _valid_name(name):
        ck.fail(item, "name", f"strategy name {name!r} must be letters, digits, '-', '_' or '.'")
    if method not in registry.names():
        ck.fail(item, "method" if "method" in item else "name",
                f"strategy '{name}': unknown method {method!r}; valid methods: "
                f"{', '.join(registry.names())}")
    what = f"strategy '{name}'"
    preset, targets = item.get("preset"), item.get("targets")
    if preset is not None and str(preset) not in PRESETS:
        ck.fail(item, "preset", f"{what}: unknown preset {preset!r}; valid presets: "
                f"{', '.join(PRESETS)} (or list module names under 'targets')")
    if targets is not None:
        targets = (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets)
    if preset is not None and targets is not None:
        ck.fail(item, "targets", f"{what}: set 'preset' or 'targets', not both")
    if not registry.get_spec(method).uses_lora:
        for key in LORA_FIELDS:
            if item.get(key) is not None:
                ck.fail(item, key, f"{what}: '{key}' only applies to LoRA methods, not "
                        f"'{method}'; remove it")
    peft = _parse_peft(ck, item, what, method)
    rank = ck.number(item, "rank", what, kind=int, minimum=1)
    alpha = ck.number(item, "alpha", what, minimum=0, exclusive=True)
    dropout = ck.number(item, "dropout", what, minimum=0)
    if dropout is not None and dropout >= 1:
        ck.fail(item, "dropout", f"{what}: dropout must be in [0, 1), got {dropout}")
    return Strategy(name=name, method=method, preset=None if preset is None else str(preset),
                    targets=targets, rank=rank, alpha=alpha, dropout=dropout,
                    lr=ck.number(item, "lr", what, minimum=0, exclusive=True),
                    rslora=None if item.get("rslora") is None else bool(item["rslora"]),
                    dora=None if item.get("dora") is None else bool(item["dora"]),
                    init=None if item.get("init") is None else str(item["init"]),
                    lr_ratio=ck.number(item, "lr_ratio", what, minimum=0, exclusive=True),
                    head_epochs=ck.number(item, "head_epochs", what, minimum=0, exclusive=True),
                    epochs=ck.number(item, "epochs", what, minimum=0, exclusive=True),
                    max_steps=ck.number(item, "max_steps", what, kind=int, minimum=1),
                    peft=peft, options=plain(item.get("options") or {}))


def _parse_peft(ck: _Checker, item: dict, what: str, method: str) -> dict[str, Any] | None:
    """A strategy's `peft:` mapping: only for a PEFT method (registry `library`), a mapping
    whose type and keys PEFT's config class knows (`strategies.peft.check_mapping`)."""
    if item.get("peft") is None:
        return None
    if method not in peft_methods():
        ck.fail(item, "peft", f"{what}: 'peft' only applies to method "
                f"{' or '.join(peft_methods())}, not '{method}'; remove it")
    if not isinstance(item["peft"], dict):
        ck.fail(item, "peft", f"{what}: 'peft' must be a mapping of PEFT config keys, e.g. "
                "{r: 8, lora_alpha: 16} or {type: IA3}")
    mapping = plain(item["peft"])
    try:
        check_mapping(mapping)
    except UserError as exc:
        ck.fail(item, "peft", f"{what}: {exc}")
    return mapping


def _parse_strategies(ck: _Checker, raw: dict) -> tuple[Strategy, ...]:
    """The rows, with the untuned baseline (the registry's method that does not train) first
    unless the file has one."""
    if not isinstance(raw["strategies"], list):
        ck.fail(raw, "strategies", "strategies must be a list of mappings")
    strategies = [_parse_strategy(ck, item) for item in raw["strategies"]]
    names = [s.name for s in strategies]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        ck.fail(raw, "strategies", f"strategy name '{dup}' appears twice; names must be unique")
    untrained = baseline_method()
    if not any(s.method == untrained for s in strategies):
        # The untuned model is always a row: the baseline every strategy has to beat.
        name0 = "untuned" if "untuned" not in names else "untuned-model"
        strategies.insert(0, Strategy(name=name0, method=untrained))
    return tuple(strategies)


def _parse_published(ck: _Checker, raw: dict) -> dict[str, Any] | None:
    """Published numbers: labelled extra report rows, never mixed with measurements."""
    published = raw.get("published")
    if published is None:
        return None
    ck.fields(published, PUBLISHED_FIELDS, "published")
    rows = published.get("rows")
    if not isinstance(rows, list) or not rows:
        ck.fail(published, "rows", "published needs 'rows': a list of {name, params, "
                "metrics: {eval set: {metric: value}}}")
    for row in rows:
        ck.fields(row, PUBLISHED_ROW_FIELDS, "a published row")
        if not row.get("name") or not isinstance(row.get("metrics"), dict):
            ck.fail(published, "rows", "each published row needs 'name' and 'metrics'")
    return plain(published)


def _parse_report_to(ck: _Checker, raw: dict) -> tuple[str, ...] | None:
    """The trackers of every run (TrainConfig's `report_to`), checked by its own parser."""
    if raw.get("report_to") is None:
        return None
    try:
        return parse_report_to(raw["report_to"])
    except UserError as exc:
        ck.fail(raw, "report_to", str(exc))


def _locations(ck: _Checker, raw: dict, study: Study) -> dict[str, dict[str, str]]:
    """For each strategy, where each TrainConfig key of its runs was set, in the order
    `plan.run_config` applies them (a later source overrides an earlier one)."""
    data_raw = raw["data"] if isinstance(raw["data"], dict) else {}
    base: dict[str, str] = {key: location(ck.source, raw, key)
                            for key in ("model", "task", "data", "num_labels", "report_to")}
    base["data_fraction"] = location(ck.source, data_raw, "fraction")
    budget_raw = raw.get("budget") or {}
    base |= {key: location(ck.source, budget_raw, key) for key in budget_raw}
    options_raw = raw.get("train_options") or {}
    items = {str(item.get("name")): item for item in raw["strategies"]}
    out: dict[str, dict[str, str]] = {}
    for strategy in study.strategies:
        item = items.get(strategy.name, {})
        where = dict(base)
        where |= {key: location(ck.source, item, key) for key in item if key != "options"}
        if "targets" in item:
            where["preset"] = location(ck.source, item, "targets")
        where |= {key: location(ck.source, options_raw, key) for key in options_raw}
        opts = item.get("options") or {}
        where |= {key: location(ck.source, opts, key) for key in opts}
        where["_strategy"] = location(ck.source, item, "name") if item else ck.source
        out[strategy.name] = where
    return out


# ----------------------------------------------------------------------------- variants
def with_seeds(study: Study, n: int | None) -> Study:
    """`--seeds N` overrides the study's seeds with 0..N-1. Raises UserError for N < 1."""
    if n is None:
        return study
    if n < 1:
        raise UserError(f"--seeds must be >= 1, got {n}; pass a positive count")
    return dataclasses.replace(study, seeds=tuple(range(n)))


def study_summary(study: Study) -> dict[str, Any]:
    """What the report shows as "the study": the validated file, with the untuned row added."""
    raw = dict(study.raw)
    raw["seeds"] = list(study.seeds)
    raw["budget"] = dict(study.budget)
    raw["strategies"] = [{k: v for k, v in dataclasses.asdict(s).items() if v not in (None, {})}
                         for s in study.strategies]
    return raw


def config_error_location(study: Study, strategy: str, exc: ConfigError) -> str:
    """Where the value a TrainConfig `ConfigError` names was set for `strategy`'s runs: the
    key's `file:line` (or override), else the strategy's own line."""
    where = study.locations.get(strategy, {})
    loc = where.get(exc.key)
    if loc is None or loc == study.path:
        loc = where.get("_strategy") or study.path or "<study>"
    return loc
