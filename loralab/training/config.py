"""The training config: every knob of a run, its defaults, and the one validator."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from loralab.errors import UserError
from loralab.kernels.compiling import COMPILE_SETTINGS
from loralab.training.batching import epoch_order, target_count  # noqa: F401  (epoch_order re-exported)

METHODS = ("none", "full", "head", "lora", "lora-head", "qat-lora", "qlora", "lora-ptq")


LORA_METHODS = ("lora", "lora-head", "qat-lora", "qlora", "lora-ptq")


TASKS = ("lm", "classify", "generate")


SCHEDULES = ("linear", "cosine", "constant")


PRECISIONS = ("auto", "fp32", "bf16")


PARALLEL = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. Serialised in full into the run record."""

    model: str = "minilm-l6"
    """Backbone: a bundled name (smollm2-135m, minilm-l6), a local directory or a hub id."""
    task: str = "classify"
    """lm (causal language modelling), classify (sequence classification), generate
    (data-to-text: causal LM with loss on the target tokens only)."""
    data: str = "rt-snippets"
    """Dataset preset name or a local path (see loralab.data.tasks)."""
    eval_data: tuple[str, ...] = ()
    """Extra evaluation sets (preset names or paths), evaluated on their test/validation split."""
    method: str = "lora"
    """none | full | head | lora | lora-head | qat-lora | qlora | lora-ptq."""
    preset: str = "qv"
    """LoRA target preset (qv, attn, attn-proj, attn-proj-ffn, all) or comma-separated names."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input."""
    rslora: bool = False
    """Scale by alpha / sqrt(r) instead (rank-stabilised LoRA)."""
    quant: str = "int8"
    """qat-lora / qlora / lora-ptq: quantization scheme (int8, int8-dyn, int4, int4-weight, nf4,
    int4-cuda); see loralab.quant.core.SCHEMES."""
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
    last two need `pip install 'loralab[tracking]'`), or none; see loralab.training.tracking. Like
    tracking_group and tracking_dir it is never part of a study's config hash."""
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
        from loralab.training.tracking import parse_report_to

        object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        checks = [
            (self.method in METHODS, f"unknown method {self.method!r}; choose one of "
                                     f"{', '.join(METHODS)}"),
            (self.task in TASKS, f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of "
                                         f"{', '.join(SCHEDULES)}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; use auto, "
                                           "fp32 or bf16"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.epochs > 0 or self.max_steps, f"epochs must be > 0, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1,
             f"max_steps must be >= 1, got {self.max_steps}"),
            (self.lr >= 0, f"lr must be >= 0, got {self.lr}"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 < self.data_fraction <= 1, "data_fraction must be in (0, 1]"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.seq_len >= 2, "seq_len must be >= 2"),
            (self.parallel in PARALLEL, f"unknown parallel {self.parallel!r}; choose one of "
                                        f"{', '.join(PARALLEL)}"),
            (self.parallel != "fsdp" or self.method == "full",
             f"parallel fsdp shards full fine-tuning only, not method {self.method!r}; use "
             "--parallel ddp or auto"),
            (self.rank >= 1, f"LoRA rank must be >= 1, got {self.rank}"),
            (self.eval_max_examples >= 0,
             f"eval_max_examples must be >= 0 (0 = all), got {self.eval_max_examples}"),
            (self.compile in COMPILE_SETTINGS, f"unknown compile {self.compile!r}; choose "
                                               f"{', '.join(COMPILE_SETTINGS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eval_data"] = list(self.eval_data)
        d["report_to"] = list(self.report_to)
        return d


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Convert YAML/CLI strings to the field's type (int, float, bool, tuple, optional)."""
    if value is None:
        return None
    kind = str(config_fields()[name].type)
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("tuple"):
            if isinstance(value, str):
                return tuple(v for v in value.split(",") if v)
            return tuple(str(v) for v in value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config key {name!r}: cannot use {value!r} as {kind}") from None


def make_config(values: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a mapping plus overrides (None overrides are ignored); unknown keys
    raise a UserError that lists the valid ones."""
    merged = dict(values or {})
    merged.update({k.replace("-", "_"): v for k, v in overrides.items() if v is not None})
    merged = {k.replace("-", "_"): v for k, v in merged.items()}
    if "wandb" in merged:  # the old switch (records, configs before report_to): W&B on or off
        from loralab.training.tracking import parse_report_to

        on = merged.pop("wandb")
        on = on.lower() in ("1", "true", "yes", "on") if isinstance(on, str) else bool(on)
        kept = parse_report_to(merged.get("report_to", ("tensorboard",)))
        merged["report_to"] = kept + ("wandb",) * (on and "wandb" not in kept)
    valid = config_fields()
    unknown = sorted(set(merged) - set(valid))
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)}; valid keys: "
                        f"{', '.join(valid)}")
    return TrainConfig(**{k: _coerce(k, v) for k, v in merged.items()})


def config_from_yaml(path: str | os.PathLike | None, **overrides: Any) -> TrainConfig:
    """Read a YAML mapping of TrainConfig fields, then apply CLI overrides on top."""
    values: dict = {}
    if path is not None:
        import yaml

        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise UserError(f"cannot read config file {path}: {exc.strerror}; check the path") \
                from None
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML ({exc}); fix its syntax") \
                from None
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must hold a mapping of keys to values")
    return make_config(values, **overrides)
