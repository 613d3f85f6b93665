"""The training config: every knob of a run, its defaults, its documentation and the one validator.

`TrainConfig` is the single definition of a run's settings. Its fields' attribute docstrings
and defaults generate the `loralab train` options (`loralab.cli.train`); a study file's keys and
`--config FILE.yaml` are the same fields (`make_config`); and `TrainConfig.__post_init__` is
the one place that checks them, raising `ConfigError(key, message)` so a study can point at
the file line that set the key.

This module imports neither torch nor transformers (a test checks it): the command line reads
it to build `--help` before any heavy import, and the choices of `method` come from the
torch-free strategy registry.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import types
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from loralab.data import MIN_SEQ_LEN
from loralab.errors import ConfigError, UserError
from loralab.lora.config import INITS, PRESETS
from loralab.training.strategies import registry

METHODS = registry.names()
"""Every fine-tuning method, in registry order."""

TASKS = ("lm", "classify", "generate")

SCHEDULES = ("linear", "cosine", "constant")

PRECISIONS = ("auto", "fp32", "bf16")

PARALLEL = ("auto", "ddp", "fsdp")

COMPILE_SETTINGS = ("auto", "on", "off")

TRACKERS = ("tensorboard", "wandb", "mlflow")

TRACKING_FIELDS = ("report_to", "tracking_group", "tracking_dir")
"""TrainConfig fields that choose where results are reported; never part of a config hash."""

CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS, "task": TASKS, "schedule": SCHEDULES, "precision": PRECISIONS,
    "parallel": PARALLEL, "compile": COMPILE_SETTINGS, "init": INITS}
"""The fields whose value is one of a fixed set (the CLI offers them as `choices`)."""



def choices_of(key: str) -> tuple[str, ...]:
    """The valid values of choice field `key`, read when asked: the method names come from the
    registry at validation time, so a method added to it is valid without re-importing this."""
    return registry.names() if key == "method" else CHOICES[key]


def lora_methods() -> tuple[str, ...]:
    """The methods that train LoRA adapters (rank, alpha, dropout and targets apply to them)."""
    return tuple(name for name in registry.names() if registry.get_spec(name).uses_lora)


def peft_methods() -> tuple[str, ...]:
    """The methods that train PEFT's own implementation (registry `library` "PEFT"): they take
    the `peft` mapping."""
    return tuple(name for name in registry.names()
                 if registry.get_spec(name).library == registry.PEFT)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_mapping(key: str, value: Any) -> dict[str, Any]:
    """A mapping field's value (`peft`): a dict as it is (keys as strings), or its JSON / YAML
    flow text (`'{"r": 8, "target_modules": ["q_proj"]}'`, `'{r: 8}'`) parsed. Raises
    ConfigError(key, ...) when it is not a mapping."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError:
            raise ConfigError(key, f"config key {key!r}: cannot read {value!r} as a mapping; "
                              f"give JSON, e.g. --{key} '{{\"r\": 8}}'") from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"config key {key!r} must be a mapping of keys to values, got "
                          f"{value!r}; give JSON, e.g. --{key} '{{\"r\": 8}}'")
    return {str(k): v for k, v in value.items()}


def parse_report_to(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """`tensorboard,wandb` (or a list) -> ('tensorboard', 'wandb'), in the given order without
    repeats; 'none' (or nothing) -> () (no tracker at all).

    Raises ConfigError('report_to', ...) naming the valid trackers for an unknown name."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = tuple(dict.fromkeys(n.strip().lower() for n in items if n.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError("report_to", f"unknown tracker {unknown[0]!r} in report_to; choose "
                          f"from {', '.join(TRACKERS)} (comma-separated) or none")
    return names


def parse_targets(value: str | tuple[str, ...] | list[str]) -> str | tuple[str, ...]:
    """LoRA targets as the config holds them: a preset name (or one module name / glob) stays a
    string; several module names / globs, given comma-separated or as a list, become a tuple.
    `"attn-proj"` -> `"attn-proj"`, `"q_proj,v_proj"` -> `("q_proj", "v_proj")`."""
    if isinstance(value, str):
        if "," not in value:
            return value.strip()
        value = value.split(",")
    return tuple(t for t in (str(v).strip() for v in value) if t)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. Serialised in full into the run record (`to_dict`)."""

    model: str = "minilm-l6"
    """Backbone: a bundled name (smollm2-135m, minilm-l6), a local directory or a hub id."""
    task: str = "classify"
    """lm (causal language modelling), classify (sequence classification), generate
    (data-to-text: causal LM with loss on the target tokens only)."""
    data: str = "rt-snippets"
    """Dataset preset name or a local path (see loralab.data.tasks)."""
    eval_data: tuple[str, ...] = ()
    """Extra evaluation sets (preset names or paths, comma-separated), evaluated on their
    test/validation split."""
    method: str = "lora"
    """Fine-tuning method (loralab.training.strategies.registry)."""
    preset: str | tuple[str, ...] = "qv"
    """LoRA targets: a preset (qv, attn, attn-proj, attn-proj-ffn, all) or module names /
    globs, comma-separated (held as a tuple; written back comma-joined in the record)."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input."""
    rslora: bool = False
    """Scale by alpha / sqrt(r) instead (rank-stabilised LoRA)."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA, Liu et al. 2024): a trained magnitude per output feature
    times the direction (W + s B A) / ||W + s B A||; saved as PEFT's use_dora."""
    init: str = "kaiming"
    """How the adapters start: kaiming or gaussian (B = 0), pissa (principal singular vectors
    of W, Meng et al. 2024) or olora (QR of W, Buyukakyuz 2024); with pissa and olora the base
    keeps the residual and the saved adapter is converted to one on the original base."""
    svd_niter: int = 0
    """init pissa: 0 = exact SVD, k > 0 = randomized SVD with k subspace iterations (faster on
    large layers)."""
    lr_ratio: float = 1.0
    """LoRA+ (Hayou et al. 2024): B's learning rate is lr_ratio x A's (the paper suggests 16);
    1 = plain LoRA."""
    peft: dict[str, Any] | None = field(default=None, hash=False)
    """method peft: PEFT's config as a mapping (JSON or YAML on the command line, e.g.
    '{"r": 8}'), passed to peft.LoraConfig, or to another PEFT config type named by a `type`
    key (IA3, VeRA, LoHa, LoKr, ...); r, lora_alpha, lora_dropout and target_modules default to
    rank, alpha, dropout and preset (see loralab.training.strategies.peft)."""
    quant: str = "int8"
    """qat-lora / qlora / lora-ptq: quantization scheme (int8, int8-dyn, int4, int4-weight, nf4,
    int4-cuda); see loralab.quant.SCHEMES."""
    epochs: float = 1.0
    """Passes over the training split (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs."""
    batch_size: int = 8
    """Examples per micro-batch, summed over all processes."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: the global batch is batch_size x grad_accum."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (never applied to biases and norm layers)."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to lr."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of all steps (used when warmup_steps is 0)."""
    schedule: str = "linear"
    """After warm-up: linear decay to 0, cosine decay to 0, or constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    label_smoothing: float = 0.0
    """Label smoothing of the training cross-entropy (evaluation uses plain CE)."""
    precision: str = "auto"
    """fp32, bf16 autocast (weights stay fp32), or auto: bf16 where the device multiplies bf16
    natively (AVX512-BF16 / AMX-BF16 CPUs, bf16 GPUs), fp32 elsewhere (`resolve_precision`)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward instead of storing them."""
    parallel: str = "auto"
    """Under torchrun: auto (FSDP for full fine-tuning, DDP otherwise), ddp, or fsdp (full
    only: parameters, gradients and optimizer state sharded over the processes)."""
    compile: str = "auto"
    """torch.compile the repeated blocks (loralab.kernels.compiling): auto (runs with at least
    compiling.AUTO_MIN_FLOPS of estimated work, where the compile time pays back), on, or off."""
    fused_loss: bool = True
    """Causal LMs: compute the loss from hidden states in chunks, never the full logits
    (loralab.kernels.losses); off = the model's own logits + cross-entropy."""
    seq_len: int = 128
    """Maximum tokens per example."""
    data_fraction: float = 1.0
    """Use this fraction of the training split (a seeded subset)."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    eval_every: int = 0
    """Evaluate (and checkpoint) every N optimizer steps; 0 = only at epoch ends."""
    eval_batches: int = 0
    """Batches of the validation split used by periodic evaluations (0 = all). The final
    evaluation uses every example of every evaluation split, unless eval_max_examples is set."""
    eval_max_examples: int = 0
    """Bound every evaluation split (validation, test, eval_data) to this many examples, the
    same fixed subset for every run, as a study's eval_max_examples (0 = all, the default):
    for quick runs, whose final evaluation would otherwise take longer than the training."""
    checkpoint_every: int = 0
    """Also write the resume checkpoint every N steps (0 = at evaluations only)."""
    head_epochs: float = 1.0
    """lora-head: the last head_epochs epochs train the head only, adapters frozen."""
    out: str = "runs/run"
    """Run directory: record.json, tb/, checkpoints/, adapter/ or model/ or head/."""
    num_labels: int = 2
    """Classes for classify."""
    report_to: tuple[str, ...] = ("tensorboard",)
    """Trackers that get the curves, final metrics and costs: tensorboard, wandb, mlflow (the
    last two need `pip install 'loralab[tracking]'`), comma-separated, or none; see
    loralab.training.tracking. Like tracking_group and tracking_dir it is never part of a
    study's config hash."""
    tracking_group: str = ""
    """W&B group and MLflow experiment of the run (a study sets its name)."""
    tracking_dir: str = ""
    """Where the local MLflow store (mlflow.db) goes when MLFLOW_TRACKING_URI is unset:
    default the run directory; a study sets its output directory (one store per study)."""
    keep_best: bool = True
    """Restore the weights with the best validation loss before the final evaluation."""
    log_every: int = 0
    """Plain progress lines every N steps when not on a terminal (0 = about 20 lines per run)."""

    def __post_init__(self) -> None:
        if isinstance(self.eval_data, (list, str)):
            value = (self.eval_data,) if isinstance(self.eval_data, str) else self.eval_data
            object.__setattr__(self, "eval_data", tuple(value))
        object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        object.__setattr__(self, "preset", parse_targets(self.preset))
        if self.peft is not None:
            object.__setattr__(self, "peft", parse_mapping("peft", self.peft))
        for key, ok, message in self._checks():
            if not ok:
                raise ConfigError(key, message)

    def _checks(self) -> list[tuple[str, bool, str]]:
        """(field, holds, message if it does not), in the order they are reported."""
        how = {"precision": "use auto, fp32 or bf16", "compile": "choose auto, on, off"}
        checks = [(key, getattr(self, key) in choices_of(key),
                   f"unknown {key} {getattr(self, key)!r}; "
                   + how.get(key, f"choose one of {', '.join(choices_of(key))}"))
                  for key in CHOICES]
        return checks + [
            ("batch_size", self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            ("grad_accum", self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            ("epochs", self.epochs > 0 or bool(self.max_steps),
             f"epochs must be > 0, got {self.epochs}"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1,
             f"max_steps must be >= 1, got {self.max_steps}"),
            ("lr", self.lr >= 0, f"lr must be >= 0, got {self.lr}"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            ("data_fraction", 0 < self.data_fraction <= 1, "data_fraction must be in (0, 1]"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            ("warmup_steps", self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            ("seq_len", self.seq_len >= MIN_SEQ_LEN,
             f"seq_len must be >= {MIN_SEQ_LEN}, got {self.seq_len}"),
            ("parallel", self.parallel != "fsdp" or self.method not in registry.names()
             or registry.get_spec(self.method).shardable,
             f"parallel fsdp shards full fine-tuning only, not method {self.method!r}; use "
             "--parallel ddp or auto"),
            ("rank", self.rank >= 1, f"LoRA rank must be >= 1, got {self.rank}"),
            ("alpha", self.alpha > 0, f"LoRA alpha must be > 0, got {self.alpha}"),
            ("dropout", 0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), got "
             f"{self.dropout}"),
            ("lr_ratio", self.lr_ratio > 0, f"lr_ratio must be > 0, got {self.lr_ratio}"),
            ("svd_niter", self.svd_niter >= 0, f"svd_niter must be >= 0, got {self.svd_niter}"),
            ("lr_ratio", self.lr_ratio == 1.0 or self.method in lora_methods(),
             f"lr_ratio (LoRA+) sets the rate of LoRA's B matrices and applies to LoRA methods "
             f"({', '.join(lora_methods())}), not {self.method!r}; remove it or use lr_ratio 1"),
            ("peft", self.peft is None or self.method in peft_methods(),
             f"peft (a PEFT config mapping) applies to method "
             f"{' or '.join(peft_methods()) or 'peft'}, not {self.method!r}; remove it or use "
             f"--method {' or '.join(peft_methods()) or 'peft'}"),
            *self._variant_checks(),
            ("head_epochs", self.head_epochs > 0, f"head_epochs must be > 0, got "
             f"{self.head_epochs}"),
            ("preset", bool(self.preset) or self.method not in lora_methods(),
             f"no LoRA targets given; use a preset ({', '.join(PRESETS)}) or module names"),
            ("eval_max_examples", self.eval_max_examples >= 0,
             f"eval_max_examples must be >= 0 (0 = all), got {self.eval_max_examples}"),
        ]

    def _variant_checks(self) -> list[tuple[str, bool, str]]:
        """DoRA and PiSSA/OLoRA initialisation change the float layer: they apply to the float
        LoRA methods only (registry: uses_lora and not quantized)."""
        spec = registry.get_spec(self.method) if self.method in registry.names() else None
        float_lora = spec is not None and spec.uses_lora and not spec.quantized
        return [
            ("dora", not self.dora or float_lora,
             f"dora applies to the float LoRA methods, not {self.method!r}; use method "
             f"{' or '.join(m for m in lora_methods() if not registry.get_spec(m).quantized)}"),
            ("init", self.init in ("kaiming", "gaussian") or float_lora,
             f"init {self.init!r} applies to the float LoRA methods, not {self.method!r}; "
             "use init kaiming"),
        ]

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-able values, the layout record.json has always had: tuples as
        lists, LoRA targets as one comma-joined string."""
        d = dataclasses.asdict(self)
        d["eval_data"] = list(self.eval_data)
        d["report_to"] = list(self.report_to)
        if isinstance(self.preset, tuple):
            d["preset"] = ",".join(self.preset)
        return d


def config_fields() -> dict[str, dataclasses.Field]:
    """TrainConfig's fields by name, in declaration order."""
    return {f.name: f for f in fields(TrainConfig)}


@cache
def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's attribute docstring (the string literal right under it), whitespace
    collapsed to single spaces; "" for a field without one. Read from the class's source,
    as litgpt's CLI reads its dataclasses."""
    body = ast.parse(inspect.getsource(cls)).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, after in zip(body.body, [*body.body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = after.value.value if (isinstance(after, ast.Expr) and isinstance(
                after.value, ast.Constant) and isinstance(after.value.value, str)) else ""
            docs[node.target.id] = " ".join(text.split())
    return docs


@cache
def field_kinds() -> dict[str, tuple[type, bool]]:
    """Each field's value type (bool, int, float, str, tuple or dict; `str | tuple` fields:
    tuple) and whether it may be None, from the annotations."""
    hints = typing.get_type_hints(TrainConfig)
    kinds: dict[str, tuple[type, bool]] = {}
    for name, hint in hints.items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        optional = type(None) in args
        bases = [typing.get_origin(a) or a for a in args if a is not type(None)]
        kinds[name] = (tuple if tuple in bases else bases[0], optional)
    return kinds


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type (int, float, bool, tuple, dict: a mapping
    or its JSON text, optional).
    Raises ConfigError naming the field when the value cannot be one."""
    if value is None:
        return None
    kind, _ = field_kinds()[name]
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in _TRUE + _FALSE:
                    return value.lower() in _TRUE
                raise ValueError(value)
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        if kind is dict:
            return parse_mapping(name, value)
        if kind is tuple:
            if name == "preset":
                return parse_targets(value if isinstance(value, str) else list(value))
            if isinstance(value, str):
                return tuple(v for v in value.split(",") if v)
            return tuple(str(v) for v in value)
        return str(value)
    except (TypeError, ValueError):
        shown = str(field_kinds()[name][0].__name__)
        raise ConfigError(name, f"config key {name!r}: cannot use {value!r} as {shown}") \
            from None


def make_config(values: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a mapping plus overrides (None overrides are ignored; `-` in keys
    reads as `_`). Unknown keys raise a ConfigError that lists the valid ones."""
    merged = dict(values or {})
    merged.update({k.replace("-", "_"): v for k, v in overrides.items() if v is not None})
    merged = {k.replace("-", "_"): v for k, v in merged.items()}
    if "wandb" in merged:  # the old switch (records, configs before report_to): W&B on or off
        on = merged.pop("wandb")
        on = on.lower() in _TRUE if isinstance(on, str) else bool(on)
        kept = parse_report_to(merged.get("report_to", ("tensorboard",)))
        merged["report_to"] = kept + ("wandb",) * (on and "wandb" not in kept)
    valid = config_fields()
    unknown = sorted(set(merged) - set(valid))
    if unknown:
        raise ConfigError(unknown[0], f"unknown config key(s) {', '.join(unknown)}; valid "
                          f"keys: {', '.join(valid)}")
    return TrainConfig(**{k: _coerce(k, v) for k, v in merged.items()})


def config_from_yaml(path: str | os.PathLike | None, **overrides: Any) -> TrainConfig:
    """Read a YAML mapping of TrainConfig fields, then apply overrides on top (the command
    line's options; None = not given). Raises UserError for an unreadable or malformed file."""
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise UserError(f"cannot read config file {path}: {exc.strerror}; check the path") \
                from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            what = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise UserError(f"{where}: config file is not valid YAML ({what}); fix its syntax") \
                from None
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must hold a mapping of keys to values")
    return make_config(values, **overrides)
