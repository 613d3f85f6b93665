"""One training loop for every strategy, with cost measurement, logging, resume, DDP and FSDP.

Strategies (`TrainConfig.method`):

    none       evaluate the pretrained model, no training
    full       every parameter trains (FSDP when distributed, or DDP with --parallel ddp)
    head       only the task head (all its modules) trains; the frozen body runs under no_grad
    lora       LoRA adapters (+ the whole freshly initialised task head for `classify`)
    lora-head  LoRA first, then adapters frozen and the head alone for the last `head_epochs`
    qat-lora   LoRA on a fake-quantized body (QAT), then merged and really quantized (loralab.quant.core)
    qlora      LoRA on a really quantized frozen base (int8 / int4 / nf4 weights; loralab.quant.core)
    lora-ptq   LoRA in float, then merged and post-training quantized (loralab.quant.core)

The loop: AdamW (fused where available) without weight decay on biases and norm layers, a
warm-up + linear/cosine/constant schedule, gradient accumulation with the loss averaged over all
target tokens of the optimizer step, clipping, label smoothing, fp32 or bf16 autocast, optional
gradient checkpointing, periodic evaluation with best-checkpoint selection on validation loss.

Data order is a pure function of (seed, epoch): step s of an epoch takes the examples
perm[s G:(s+1) G] with G = batch_size x grad_accum, micro-batch k takes its k-th slice of
batch_size, and with N processes rank r takes the r-th of N equal parts of each micro-batch. So
the global batch and the sum being optimised do not depend on N, and a resumed run sees exactly
the batches the interrupted one would have seen.

The loss of one optimizer step is

    L = sum over micro-batches and ranks of sum_t CE(logits_t, y_t) / T_step

where T_step counts the target tokens (examples for `classify`) of the whole step, known before
the first micro-batch runs. Each micro-batch back-propagates its share directly (times N, since
DDP averages gradients over ranks), so accumulation gives exactly the gradient of L.

Distributed (`torchrun --nproc-per-node N`, gloo on CPU, NCCL on GPU): LoRA, head-only and
the other methods use DDP (every rank holds the whole model; gradients all-reduced once per
optimizer step, `no_sync` on the other micro-batches). Full fine-tuning uses FSDP2
(`fully_shard`, `parallel="auto"` or `"fsdp"`): each transformer block, then a root holding the
rest (embeddings, final norm, the tied lm_head, and the fused loss that reads the head), is
sharded along dim 0, so a rank holds 1/N of the weights, gradients and AdamW state (fused AdamW
and `clip_grad_norm_` run on the DTensor shards). A block's weights are all-gathered for its
forward and again for its backward; gradients are reduce-scattered at the last micro-batch of a
step (`set_requires_gradient_sync`). Evaluation runs the sharded forward on every rank; only
rank 0 logs and writes. Checkpoints gather whole tensors to rank 0's CPU
(`get_model_state_dict` / `get_optimizer_state_dict`, full_state_dict + cpu_offload) and store
them in the single-process layout (a run stopped under FSDP can finish in one process); on
resume and for the best-checkpoint restore every rank reads the file (a filesystem all ranks
see) and keeps its shards. The final model is an ordinary `save_pretrained` directory.
Limits: FSDP is for
`method=full` only; a gathered checkpoint must fit in rank 0's CPU memory; no CPU offload of
parameters, no mixed-precision policy beyond bf16 autocast, no hybrid (HSDP) sharding; the
memory figures of the record are per process (this rank's shards).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loralab.training import batching
from loralab.kernels import compiling
from loralab.costs import measure
from loralab.training import checkpoint as ckpt
from loralab.kernels.attention import use_dropout_attention
from loralab.training.batching import epoch_order, target_count  # noqa: F401  (epoch_order re-exported)
from loralab.kernels.compiling import COMPILE_SETTINGS
from loralab.data.tasks import subsample
from loralab.devices import device_defaults
from loralab.lora.dropout import seeded_dropouts
from loralab.errors import UserError
from loralab.kernels.lean_mlp import lean_mlps
from loralab.models.loading import head_parameters, task_head_modules, untie_head
from loralab.progress import Progress

METHODS = ("none", "full", "head", "lora", "lora-head", "qat-lora", "qlora", "lora-ptq")
LORA_METHODS = ("lora", "lora-head", "qat-lora", "qlora", "lora-ptq")
TASKS = ("lm", "classify", "generate")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("auto", "ddp", "fsdp")


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


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


# --- building a config from YAML + overrides ---------------------------------------------------

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


# --- distributed ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) job."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo
    on CPU. Each process uses GPU `LOCAL_RANK` when GPUs exist."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank=rank, world=world, device=device)


def _all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(x)
    return x


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# --- model and data -----------------------------------------------------------------------

def load_pieces(config: TrainConfig) -> tuple[Any, Any, float]:
    """(loaded model, task data, data preparation seconds) via loralab.models.loading / loralab.data.tasks."""
    from loralab.data.tasks import load_task_data
    from loralab.models.loading import load_model

    loaded = load_model(config.model, config.task, num_labels=config.num_labels)
    t0 = time.perf_counter()
    data = load_task_data(config.data, config.task, loaded.tokenizer, seq_len=config.seq_len,
                          data_fraction=config.data_fraction, seed=config.seed)
    return loaded, data, time.perf_counter() - t0


def _lora_targets(preset: str) -> str | tuple[str, ...]:
    return tuple(p for p in preset.split(",") if p) if "," in preset else preset


def prepare_model(model: nn.Module, config: TrainConfig, device_type: str = "cpu") -> list[str]:
    """Make exactly the strategy's parameters trainable (in place). Returns notes.

    `device_type` is where the run trains: the CPU-measured speed-ups (lean MLPs, seeded
    dropout, the seeded-dropout attention) are installed only where `devices.device_defaults`
    allows them, so on CUDA the model keeps SDPA (flash / memory-efficient) and nn.Dropout."""
    notes: list[str] = []
    if config.method in ("qat-lora", "qlora", "lora-ptq"):
        from loralab.quant.core import prepare_method

        notes += prepare_method(model, config.method, config.quant)
    if config.method in ("head", "lora-head") and config.task != "classify":
        if untie_head(model):
            notes.append("lm_head untied from the input embeddings so only the head trains")
    if config.method == "none":
        model.requires_grad_(False)
    elif config.method == "full":
        model.requires_grad_(True)
    elif config.method == "head":
        model.requires_grad_(False)
        for p in head_parameters(model):  # every module of the head, not just its last layer
            p.requires_grad_(True)
    elif config.method in LORA_METHODS:
        from loralab.lora.layer import LoRAConfig, apply_lora

        train_head = config.task == "classify"
        apply_lora(model, LoRAConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                                     targets=_lora_targets(config.preset), rslora=config.rslora,
                                     train_head=train_head))
        if config.method == "lora-head":
            for p in head_parameters(model):  # in the optimizer from the start
                p.requires_grad_(True)
    speedups = device_defaults(device_type)
    if config.method == "full" or config.method in LORA_METHODS:
        # frozen MLPs store less for backward (SwiGLU 2 of 3 activations, GPT-2 1 of 4); a
        # projection that trains or carries an adapter takes the plain path, where GPT-2's MLP
        # still runs the fused GELU in training (loralab.kernels.lean_mlp)
        if speedups.lean_mlps:
            lean_mlps(model)
        # the model's own dropout (GPT-2, BERT: p = 0.1) with the cheap seeded masks, and
        # attention dropout without SDPA's math path (loralab.lora.dropout, loralab.kernels.attention)
        if speedups.seeded_dropout:
            seeded_dropouts(model)
        if speedups.seeded_dropout_attention:
            use_dropout_attention(model)
    note = head_note(model, config)
    return notes + ([note] if note else [])


def head_note(model: nn.Module, config: TrainConfig) -> str | None:
    """What the run does with the task head, read from which head parameters require grad
    (never inferred from the method's name), e.g. `task head trained fully: pre_classifier
    (Linear, 4,160 parameters) + classifier (Linear, 130 parameters)`, and the head modules
    that stay frozen. None for `none` and `full`, where nothing / everything trains."""
    from loralab.models.loading import describe_head

    if config.method in ("none", "full"):
        return None
    own = {id(p) for p in head_parameters(model)}
    kinds: dict[str, list[str]] = {"trained fully": [], "partly trained": [], "frozen": []}
    for name, head in task_head_modules(model).items():
        grads = [p.requires_grad for p in head.parameters() if id(p) in own]
        kind = "trained fully" if grads and all(grads) else (
            "partly trained" if any(grads) else "frozen")
        kinds[kind].append(name)
    when = " (in the head phase)" if config.method == "lora-head" and \
        config.task != "classify" else ""
    parts = [f"{kind}{when if kind != 'frozen' else ''}: {describe_head(model, names)}"
             for kind, names in kinds.items() if names]
    return "task head " + "; ".join(parts)


def set_phase(model: nn.Module, config: TrainConfig, phase: str) -> None:
    """lora-head: 'lora' trains adapters (+ the whole head for classify), 'head' the head only."""
    from loralab.lora.layer import lora_parameters

    for p in lora_parameters(model):
        p.requires_grad_(phase == "lora")
    for p in head_parameters(model):
        p.requires_grad_(phase == "head" or config.task == "classify")


@contextmanager
def frozen_body(model: nn.Module, heads: Sequence[nn.Module]) -> Iterator[None]:
    """Run everything before the head under no_grad and the head (and what follows) with grad.

    The root's pre-hook disables grad, a pre-hook on every head module re-enables it (the first
    head module to run, e.g. DistilBERT's pre_classifier, is where grad starts), the root's
    post-hook restores the caller's mode. The body's activations are therefore never stored.
    Works under DDP too, whose own pre/post-forward logic sees grad enabled.
    """
    state = {}

    def root_pre(module, args):
        state["prev"] = torch.is_grad_enabled()
        torch.set_grad_enabled(False)

    def head_pre(module, args):
        torch.set_grad_enabled(state.get("prev", True))

    def root_post(module, args, output):
        torch.set_grad_enabled(state.get("prev", True))

    handles = [model.register_forward_pre_hook(root_pre), model.register_forward_hook(root_post)]
    handles += [head.register_forward_pre_hook(head_pre) for head in heads]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: biases and every parameter of a normalisation layer get no decay.

    Selected by module type (LayerNorm/GroupNorm/BatchNorm/RMSNorm classes, including
    transformers' own *RMSNorm/*LayerNorm classes) and by the module's `bias` attribute.
    """
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)
    no_decay: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, norm_types) or type(module).__name__.endswith("Norm")
        for name, p in module.named_parameters(recurse=False):
            if is_norm or (name == "bias" and getattr(module, "bias", None) is p):
                no_decay.add(id(p))
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def make_optimizer(params_groups: list[dict], lr: float, device: torch.device
                   ) -> torch.optim.Optimizer:
    """AdamW, fused where the build supports it (CPU and CUDA in torch >= 2.4; also over FSDP's
    DTensor shards), else foreach."""
    groups = [g for g in params_groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based), as transformers' schedules:
    step / warmup during warm-up, then linear to 0, half a cosine to 0, or 1."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over target positions (fp32).

    lm/generate: position t predicts token t+1 (transformers' label convention, -100 ignored).
    classify: one label per example.
    """
    logits = logits.float()  # explicit: the loss is always computed in fp32
    if task == "classify":
        return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing)
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B*(T-1), V)
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100,
                           label_smoothing=label_smoothing)


def _forward_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return out.logits if hasattr(out, "logits") else out[0]


def _to(batch: dict, device: torch.device) -> dict:
    """The batch on `device`; the copies are asynchronous from pinned host memory (CUDA)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def resolve_precision(requested: str, device: torch.device | str, *,
                      native_bf16: bool | None = None) -> str:
    """The precision a run computes in, "fp32" or "bf16": fp32 and bf16 as asked; auto -> bf16
    where the device multiplies bf16 natively (`measure.native_bf16`: AVX512-BF16 or AMX-BF16
    CPUs, bf16 GPUs), fp32 elsewhere. Why: on an AMX Xeon bf16 autocast trains SmolLM2 LoRA
    1.74x faster than fp32 (validation loss +0.13%); on an AVX2-only CPU the emulated bf16
    kernels are ~30x slower. `native_bf16` may be passed in instead of read from the device."""
    if requested not in PRECISIONS:
        raise UserError(f"unknown precision {requested!r}; use auto, fp32 or bf16")
    if requested != "auto":
        return requested
    if native_bf16 is None:
        native_bf16 = measure.native_bf16(device)
    return "bf16" if native_bf16 else "fp32"


def precision_note(requested: str, resolved: str, device: torch.device | str,
                   cpu: measure.CPUInfo | None = None) -> str | None:
    """Why `auto` became what it did, for the run's notes (None for an explicit precision)."""
    if requested != "auto":
        return None
    kind = torch.device(device).type
    if kind != "cpu":
        what = "supports" if resolved == "bf16" else "has no native"
        return f"precision auto -> {resolved}: this {kind} device {what} bf16"
    cpu = cpu or measure.cpu_info()
    if cpu.flags is None:
        why = f"torch reports {'' if resolved == 'bf16' else 'no '}native bf16 (flags unknown)"
    elif resolved == "bf16":
        why = f"has native bf16 ({'/'.join(f for f in measure.BF16_FLAGS if f in cpu.flags)})"
    else:
        why = f"has no native bf16 (no {'/'.join(measure.BF16_FLAGS)})"
    return f"precision auto -> {resolved}: this CPU ({cpu.model}) {why}"


def with_resolved_precision(config: TrainConfig, device: torch.device | str) -> TrainConfig:
    """The config with `precision: auto` replaced by what it resolves to on `device`."""
    if config.precision != "auto":
        return config
    return dataclasses.replace(config, precision=resolve_precision(config.precision, device))


def _autocast(config: TrainConfig, device: torch.device):
    """bf16 autocast or nothing; the config's precision must be resolved (not auto) by now."""
    if config.precision == "auto":
        raise ValueError("precision auto must be resolved first (with_resolved_precision)")
    if config.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# --- evaluation ---------------------------------------------------------------------------

def classification_scores(preds: list[int], labels: list[int], num_labels: int) -> dict:
    """Accuracy, precision/recall/F1 and their macro averages, by scikit-learn.

    `precision`, `recall`, `f1` are for class 1 (average="binary") with 2 classes, else the
    macro averages; `*_macro` are unweighted means over all `num_labels` classes, including
    classes absent from both labels and predictions. A ratio with a zero denominator counts as
    0 (zero_division=0), so an empty class lowers the macro average instead of raising a warning.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if len(preds) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    if not labels:
        raise ValueError("classification scores need at least one example")
    classes = list(range(num_labels))
    macro = precision_recall_fscore_support(labels, preds, labels=classes, average="macro",
                                            zero_division=0)[:3]
    if num_labels == 2:
        main = precision_recall_fscore_support(labels, preds, labels=classes, average="binary",
                                               pos_label=1, zero_division=0)[:3]
    else:
        main = macro
    scores = {"accuracy": accuracy_score(labels, preds), "precision_macro": macro[0],
              "recall_macro": macro[1], "f1_macro": macro[2], "precision": main[0],
              "recall": main[1], "f1": main[2]}
    return {k: float(v) for k, v in scores.items()}


def eval_batch_size(config: TrainConfig) -> int:
    """Rows per evaluation batch: at least 32, since no activations are kept for backward and
    larger batches are cheaper per row."""
    return max(config.batch_size, 32)


def _eval_loss_module(model: nn.Module, config: TrainConfig) -> nn.Module | None:
    """For causal LMs, what returns a batch's summed next-token loss from the final hidden
    states in chunks (`loralab.kernels.losses`), so evaluation never holds the N x V logits either: a
    32 x 128 evaluation batch of SmolLM2 (49,152 words) would be 805 MB of fp32 logits, and as
    much again for the log-softmax, several times what the LoRA training step itself needs.
    None where the model's own logits are needed (classification, models whose logits are not
    just the head of the last hidden state, `fused_loss=False`, label smoothing under FSDP)."""
    if isinstance(model, _FSDPRoot):  # the root gathers the head: go through it
        loss = model.loss
        return model if loss is not None and not loss.label_smoothing else None
    return _fused_lm_loss(model, config, label_smoothing=0.0)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, collate_fn, config: TrainConfig,
             device: torch.device = torch.device("cpu"), max_batches: int = 0,
             progress: str | None = None) -> dict:
    """Mean cross-entropy per target (no label smoothing) plus task metrics: perplexity for
    lm/generate (exp of the token-mean NLL), accuracy/precision/recall/F1 for classify.
    Causal LMs take the loss from hidden states in chunks (`_eval_loss_module`). Precision
    auto is resolved for `device` first. `progress`: a label under which batches and elapsed
    time are shown on stderr (loralab.progress); None = silent."""
    config = with_resolved_precision(config, device)
    was_training = model.training
    model.eval()
    fused = _eval_loss_module(model, config)
    nll, count = 0.0, 0.0
    preds: list[int] = []
    golds: list[int] = []
    n = len(dataset)
    bs = eval_batch_size(config)
    n_batches = -(-n // bs) if not max_batches else min(max_batches, -(-n // bs))
    shown = Progress(progress or "", n_batches, enabled=progress is not None)
    for b, start in enumerate(range(0, n, bs)):
        if max_batches and b >= max_batches:
            break
        rows = [dataset[i] for i in range(start, min(n, start + bs))]
        batch = _to(collate_fn(rows), device)
        with _autocast(config, device):
            if fused is not None:
                nll += float(fused(batch["input_ids"], batch.get("attention_mask"),
                                   batch["labels"]))
            else:
                logits = _forward_logits(model, batch)
                nll += float(loss_sum(logits, batch["labels"], config.task))
        count += float(target_count(batch["labels"], config.task))
        if config.task == "classify":
            preds += logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
        shown.update()
    shown.close()
    model.train(was_training)
    loss = nll / max(count, 1.0)
    result = {"loss": loss, "targets": int(count)}
    if config.task == "classify":
        result.update(classification_scores(preds, golds, config.num_labels))
    else:
        try:
            from loralab.scoring.metrics import perplexity as _ppl

            result["perplexity"] = float(_ppl(nll, int(count)))
        except (ImportError, TypeError):
            result["perplexity"] = math.exp(min(loss, 700.0))
    return result


# --- logging ------------------------------------------------------------------------------

class Logger:
    """Scalars to the chosen trackers (`config.report_to`: TensorBoard by default, W&B,
    MLflow; loralab.training.tracking) and the progress display; a no-op off rank 0."""

    def __init__(self, config: TrainConfig, out: Path, total_steps: int, start_step: int,
                 run_id: str, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.trackers: list = []
        self.reopen: dict = {}  # tracker name -> how to re-open it (record.json `tracking`)
        self.bar = None
        self.t0 = time.perf_counter()
        self.start_step = start_step
        self.every = config.log_every or max(1, total_steps // 20)
        if not enabled:
            return
        from loralab.training.tracking import open_trackers

        self.trackers = open_trackers(config.report_to, run_id=run_id, out=out,
                                      start_step=start_step, params=_hparams(config),
                                      group=config.tracking_group,
                                      tracking_dir=config.tracking_dir)
        self.reopen = {name: t.where() for name, t in zip(config.report_to, self.trackers)}
        if sys.stderr.isatty() and total_steps > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        for tracker in self.trackers:
            if getattr(tracker, "note", ""):
                self.message(tracker.note)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log(step, values)

    def progress(self, step: int, loss: float, lr: float, tps: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
        elif step % self.every == 0 or step == self.total:
            done = step - self.start_step
            spent = time.perf_counter() - self.t0
            eta = spent / max(1, done) * (self.total - step)
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.3e} tok/s {tps:.0f} "
                  f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", file=sys.stderr,
                  flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else
             lambda s: print(s, file=sys.stderr, flush=True))(text)

    def close(self, hparams: dict | None = None, metrics: dict | None = None) -> None:
        """End every tracker: with the run's parameters and final values (metrics and costs,
        `tracking.final_values`) when it finished, as failed when `metrics` is None."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.finish(hparams or {}, metrics or {}, metrics is not None)


def _hparams(config: TrainConfig) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in config.to_dict().items()}


# --- the run ------------------------------------------------------------------------------

@dataclass
class _State:
    """Everything that changes during training and goes into a checkpoint."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_val: float = math.inf
    best_step: int = -1
    tokens: int = 0
    train_seconds: float = 0.0
    first_tokens: int = 0
    first_seconds: float = 0.0
    eval_seconds: float = 0.0
    curves: dict = field(default_factory=lambda: {"train_loss": [], "val_loss": [], "lr": []})
    peak_saved_bytes: int = 0
    peak_rss_delta: int = 0


def _trained_state(model: nn.Module, config: TrainConfig) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of the model: everything for full, else the tensors that can
    train (adapters, head), cloned to CPU."""
    if config.method == "full":
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    keep = {names[id(p)] for p in _ever_trainable(model, config)}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keep}


def _ever_trainable(model: nn.Module, config: TrainConfig) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.method == "lora-head":
        from loralab.lora.layer import lora_parameters

        seen = {id(p) for p in params}
        params += [p for p in list(lora_parameters(model)) + head_parameters(model)
                   if id(p) not in seen]
    return params


def _load_trained_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise UserError(f"checkpoint does not match the model ({unexpected[0]} unexpected); "
                        "resume with the same config")


def _save_artifact(model: nn.Module, loaded: Any, config: TrainConfig, out: Path,
                   whole: dict[str, torch.Tensor] | None = None) -> dict:
    """Store what the run produced: the adapter (PEFT format), the head tensors, or the model
    (`whole`: its gathered state dict under FSDP, whose parameters are shards)."""
    artifacts = {"adapter": None, "model": None, "head": None}
    if config.method in LORA_METHODS:
        from loralab.lora.adapter import save_adapter

        artifacts["adapter"] = str(save_adapter(model, out / "adapter"))
    elif config.method == "head":
        from safetensors.torch import save_file

        from loralab.models.loading import head_state

        tmp = out / ".head.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        # every head module, keyed by its name in the model (pre_classifier.weight, ...)
        save_file(head_state(model), str(tmp / "head.safetensors"))
        if (out / "head").exists():
            import shutil

            shutil.rmtree(out / "head")
        os.replace(tmp, out / "head")
        artifacts["head"] = str(out / "head")
    elif config.method == "full":
        tmp = out / ".model.tmp"
        model.save_pretrained(str(tmp), state_dict=dict(whole) if whole is not None else None)
        tok = getattr(loaded, "tokenizer", None)
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(str(tmp))
        if (out / "model").exists():
            import shutil

            shutil.rmtree(out / "model")
        os.replace(tmp, out / "model")
        artifacts["model"] = str(out / "model")
    return artifacts


def _fault(name: str) -> int | None:
    """Test hooks (fault injection): LORALAB_FAULT_<NAME>=step."""
    value = os.environ.get(f"LORALAB_FAULT_{name}")
    return int(value) if value else None


def _step_module(model: nn.Module, config: TrainConfig, d: Dist) -> nn.Module:
    """What a training forward calls: for causal LMs the fused-loss module (the loss from
    hidden states in chunks, no N x V logits), otherwise the model. Under FSDP this module
    becomes the sharding root (`_FSDPRoot`), so the head's gathered weight is what it reads.
    The fused loss is a device-neutral memory saving (`devices.device_defaults`: on everywhere)."""
    if not device_defaults(d.device.type).fused_loss:
        return model
    loss = _fused_lm_loss(model, config, config.label_smoothing)
    return model if loss is None else loss


def _fused_lm_loss(model: nn.Module, config: TrainConfig,
                   label_smoothing: float) -> nn.Module | None:
    """`CausalLMLoss` over `model` when the run's task and model allow the fused loss (a causal
    LM whose logits are exactly its head of the last hidden state, `fused_loss` on); else None."""
    from loralab.kernels.losses import CausalLMLoss, fused_loss_supported

    if (config.fused_loss and config.task in ("lm", "generate")
            and fused_loss_supported(model)):
        return CausalLMLoss(model, label_smoothing)
    return None


def _parallel_mode(config: TrainConfig, d: Dist) -> str:
    """single (one process), eval (method none), fsdp (full fine-tuning unless --parallel
    ddp) or ddp."""
    if d.world == 1:
        return "single"
    if config.method == "none":
        return "eval"
    if config.method == "full" and config.parallel in ("auto", "fsdp"):
        return "fsdp"
    return "ddp"


class _FSDPRoot(nn.Module):
    """The module FSDP shards last (the root): one forward for both uses, so every call runs
    the root's hooks, which all-gather what no block owns (embeddings, final norm, the tied
    lm_head) before the call and reduce-scatter its gradients after backward.

    forward(input_ids, attention_mask, labels) -> the fused loss (training, causal LMs);
    forward(input_ids=..., attention_mask=...) -> the model's output (evaluation, or training
    without the fused loss).
    """

    def __init__(self, model: nn.Module, loss: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.__dict__["loss"] = loss  # shares self.model: kept out of the module tree

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Any:
        if labels is not None and self.loss is not None:
            return self.loss(input_ids, attention_mask, labels)
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP shards one by one: transformers' `_no_split_modules`
    classes (GPT2Block, LlamaDecoderLayer, BertLayer, ...), else the children of the largest
    ModuleList. A module holding a tied parameter (BertEmbeddings, whose word embeddings a
    masked-LM head shares) is left to the root group, so the tied pair stays one parameter in
    one group."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    seen: set[int] = set()
    tied: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return [b for b in blocks if not any(id(p) in tied for p in b.parameters())]


def _shard(model: nn.Module, step_module: nn.Module, d: Dist) -> nn.Module:
    """FSDP2 in place: `fully_shard` each block, then the root `_FSDPRoot(model, loss)`.

    Each parameter becomes a DTensor holding this rank's rows (dim-0 shard, padded). A block's
    weights are all-gathered just before its forward and freed after it (gathered again for
    backward); its gradients are reduce-scattered (averaged over the N ranks, as DDP does).
    The rest (embeddings, final norm, lm_head) belongs to the root group, so a tied
    embedding/lm_head pair is one parameter in one group: gathered once, its two gradient
    contributions summed before one reduce-scatter.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    root = _FSDPRoot(model, step_module if step_module is not model else None)
    fully_shard(root, mesh=mesh)
    return root


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None
                ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """FSDP: the whole model state dict and optimizer state gathered to rank 0's CPU (empty on
    the other ranks; every rank must call it). Tied names share one tensor, and the optimizer
    state is given in `optimizer.state_dict()`'s layout, so the checkpoint is the one a
    single-process run writes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    tensors = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options) \
        if optimizer is not None else None
    if not tensors:
        return {}, None
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in tensors:
            tensors[name] = tensors[first[id(p)]]
        first.setdefault(id(p), name)
    if optim is not None:
        index = {n: i for i, n in enumerate(_optimizer_names(model, optimizer))}
        optim = {"state": {index[n]: v for n, v in sorted(optim["state"].items(),
                                                          key=lambda kv: index[kv[0]])},
                 "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                  for g in optim["param_groups"]]}
    return tensors, optim


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _set_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    tensors: dict[str, torch.Tensor], optim: dict | None) -> None:
    """FSDP: load a whole state dict (and `optimizer.state_dict()`-layout optimizer state)
    that every rank has read; each rank keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, dict(tensors), options=options)
    if optimizer is not None and optim is not None:
        names = _optimizer_names(model, optimizer)
        by_name = {"state": {names[i]: dict(v) for i, v in optim["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                    for g in optim["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=options)


def _skip_gathered(root: nn.Module, tracker: measure.SavedTensorTracker) -> None:
    """FSDP: the all-gathered weights autograd saves in a forward are parameters (FSDP frees
    them after the forward and gathers them again for backward), not activations. A pre-forward
    hook on each FSDP module, run after FSDP's own (which gathers), adds their storages to the
    tracker's skip set; the root's hook, first in every forward, starts the set afresh."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    base = set(tracker.skip)

    def gathered(module: nn.Module) -> set[int]:
        return {p.untyped_storage().data_ptr() for p in module.parameters()
                if not isinstance(p, DTensor)}

    def root_hook(module: nn.Module, args: Any) -> None:
        tracker.skip = base | gathered(module)

    def block_hook(module: nn.Module, args: Any) -> None:
        tracker.skip |= gathered(module)

    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.register_forward_pre_hook(root_hook if m is root else block_hook)


def _local_view(model: nn.Module, optimizer: torch.optim.Optimizer | None
                ) -> tuple[nn.Module, Any]:
    """FSDP: this rank's shards as plain tensors (parameters with their gradient shards, the
    optimizer state), for loralab.costs.measure's byte counts: what this process holds."""
    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor

    def local(t: Any) -> Any:
        return t.to_local() if isinstance(t, DTensor) else t

    view = nn.Module()
    view.shards = nn.ParameterList()
    for p in model.parameters():
        q = nn.Parameter(local(p).detach(), requires_grad=p.requires_grad)
        q.grad = local(p.grad).detach() if p.grad is not None else None
        view.shards.append(q)
    for i, b in enumerate(model.buffers()):
        view.register_buffer(f"b{i}", local(b))
    state = {k: {n: local(v) for n, v in s.items()} for k, s in optimizer.state.items()} \
        if optimizer is not None else {}
    return view, SimpleNamespace(state=state)


def _wrap(model: nn.Module, config: TrainConfig, d: Dist, mode: str = "ddp"
          ) -> tuple[nn.Module, str]:
    """DDP when distributed; the model itself otherwise (or the FSDP root, already sharded by
    `_shard`)."""
    if d.world == 1:
        return model, "single"
    if mode == "fsdp":
        return model, "fsdp"
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DDP(model, device_ids=ids), "ddp"


def train(config: TrainConfig, *, resume: bool = False, loaded: Any = None,
          task_data: Any = None) -> dict:
    """Run one training job and return its record (also written to `out/record.json`).

    `loaded` (with `.model`, `.tokenizer`) and `task_data` (with `.splits`, `.collate_fn`) may
    be passed in to train objects built elsewhere (tests, studies); they are otherwise made
    from the config with loralab.models.loading / loralab.data.tasks.
    """
    d = setup_distributed()
    out = Path(config.out)
    ck_dir = out / "checkpoints"
    record_path = out / "record.json"
    if not resume and (record_path.exists() or (ck_dir / ckpt.LAST).exists()):
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose "
                        "another --out")
    previous = None
    if resume and record_path.exists():
        import json

        previous = json.loads(record_path.read_text())
        if previous.get("status") == "finished":
            return previous
    # precision auto is resolved once, here; a resumed run keeps the precision it started in
    requested = config.precision
    kept = ((previous or {}).get("env") or {}).get("precision") if requested == "auto" else None
    resolved = kept if kept in ("fp32", "bf16") else resolve_precision(requested, d.device)
    precision_why = (f"precision auto -> {resolved}: kept from the run's start" if kept == resolved
                     else precision_note(requested, resolved, d.device))
    config = dataclasses.replace(config, precision=resolved)
    if config.batch_size % d.world:
        raise UserError(f"batch_size {config.batch_size} is not divisible by the {d.world} "
                        "processes; choose a multiple so every process gets an equal share")

    _barrier(d)  # every process has checked the run directory before rank 0 writes to it
    ckpt.seed_everything(config.seed)
    data_seconds = 0.0
    if loaded is None or task_data is None:
        loaded, task_data, data_seconds = load_pieces(config)
    model: nn.Module = loaded.model
    notes = list(getattr(loaded, "notes", ()))
    notes += prepare_model(model, config, d.device.type)
    model.to(d.device)
    if config.grad_checkpointing and config.method != "none":
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise UserError("this model does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False
    splits = _bounded_splits(task_data.splits, config.eval_max_examples)
    if "train" not in splits and config.method != "none":
        raise UserError(f"dataset {config.data} has no train split")
    train_set = splits.get("train")
    val_name = "validation" if "validation" in splits else ("test" if "test" in splits else None)
    collate = task_data.collate_fn

    run_id = (previous or {}).get("run_id") or f"{out.name}-{uuid.uuid4().hex[:8]}"
    trainable, total = measure.count_parameters(model)
    record: dict = {  # config: the precision asked for; env: the one computed in
        "run_id": run_id, "status": "running",
        "config": config.to_dict() | {"precision": requested}, "metrics": {},
        "costs": {"trainable_params": trainable, "total_params": total,
                  "trainable_pct": 100.0 * trainable / max(1, total)},
        "curves": {"train_loss": [], "val_loss": [], "lr": []},
        "artifacts": {"adapter": None, "model": None, "head": None,
                      "tensorboard": str(out / "tb")},
        "env": measure.environment(str(d.device)) | {"world_size": d.world,
                                                     "precision": config.precision},
        "notes": notes,
    }
    if precision_why:
        notes.append(precision_why)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(record_path, record)

    # the schedule of steps
    global_batch = config.batch_size * config.grad_accum
    steps_per_epoch = len(train_set) // global_batch if train_set is not None else 0
    if config.method != "none" and steps_per_epoch == 0:
        raise UserError(f"the train split has {len(train_set)} examples, fewer than one global "
                        f"batch ({global_batch}); lower --batch-size or --grad-accum")
    if config.method == "none":
        total_steps = 0
    elif config.max_steps:
        total_steps = config.max_steps
    else:
        total_steps = max(1, round(config.epochs * steps_per_epoch))
    head_start = total_steps
    if config.method == "lora-head":
        head_steps = min(total_steps - 1, round(config.head_epochs * steps_per_epoch))
        head_start = total_steps - max(1, head_steps)
        notes.append(f"lora-head: LoRA for steps 1-{head_start}, head only for "
                     f"{head_start + 1}-{total_steps}")
    warmup = config.warmup_steps or round(config.warmup_ratio * total_steps)

    mode = _parallel_mode(config, d)
    compiled, why = compiling.should_compile(
        config.compile, method=config.method, total_steps=total_steps, params=total,
        tokens_per_step=global_batch * config.seq_len)
    compiled = compiled and mode != "fsdp"  # FSDP runs eager here
    if compiled:
        compiling.compile_blocks(model)
        notes.append(why)
    record["env"]["compiled"] = compiled
    step_module = _step_module(model, config, d)
    fused = step_module is not model
    if mode == "fsdp":  # before the optimizer: it must hold the sharded parameters
        step_module = _shard(model, step_module, d)
    eval_net = step_module if mode == "fsdp" else model  # under FSDP every call goes via the root
    optimizer = None
    state = _State()
    phase = "lora"
    if config.method != "none":
        if config.method == "lora-head":
            set_phase(model, config, "lora")
        # every parameter that may ever train is in the optimizer; AdamW skips those whose grad
        # is None, so lora-head's phases share one optimizer and schedule
        for p in _ever_trainable(model, config):
            p.requires_grad_(True)
        optimizer = make_optimizer(decay_groups(model, config.weight_decay), config.lr, d.device)
        if config.method == "lora-head":
            set_phase(model, config, "lora")
    scheduler = (torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, config.schedule))
        if optimizer is not None else None)

    if resume and (ck_dir / ckpt.LAST).exists():
        saved = ckpt.load(ck_dir / ckpt.LAST)
        if mode == "fsdp":
            _set_full_state(model, optimizer, saved["model"], saved["optimizer"])
        else:
            _load_trained_state(model, saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = _State(**saved["state"])
        ckpt.set_rng_state(saved["rng"])
        notes.append(f"resumed from step {state.step}")
    record["curves"] = state.curves
    if config.method == "lora-head" and state.step >= head_start:
        phase = "head"
        set_phase(model, config, phase)

    logger = Logger(config, out, total_steps, state.step, run_id, d.main)
    record["tracking"] = logger.reopen  # a study's generation scores reach them afterwards
    logger.message(_final_eval_plan(splits, config))
    if config.precision == "bf16" and not measure.native_bf16(d.device):
        slow = (f"bf16 on this {d.device.type} is emulated (no AVX512-BF16/AMX or bf16 GPU): "
                "steps run several times slower than fp32; --precision fp32 is faster here")
        notes.append(slow)
        logger.message(slow)
    heads = list(task_head_modules(model).values()) if config.method in ("head", "lora-head") \
        else []
    sampler = measure.RSSSampler().start() if d.main else None
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    tracker = measure.SavedTensorTracker(skip=measure.storage_pointers(
        _local_view(model, None)[0].parameters() if mode == "fsdp" else model.parameters()))
    if mode == "fsdp":
        _skip_gathered(step_module, tracker)
    static_bytes = 0

    # step -> metrics of a periodic evaluation that read every validation example, so the final
    # evaluation of those same weights can reuse it instead of a second identical pass
    complete_evals: dict[int, dict] = {}

    def run_eval(max_batches: int) -> dict | None:
        if val_name is None or not (d.main or mode == "fsdp"):  # FSDP: every rank forwards
            return None
        t0 = time.perf_counter()
        result = evaluate(eval_net, splits[val_name], collate, config, d.device, max_batches)
        state.eval_seconds += time.perf_counter() - t0
        if not max_batches or max_batches * eval_batch_size(config) >= len(splits[val_name]):
            complete_evals[state.step] = result
        return result

    def save(best: bool = False) -> None:
        if mode == "fsdp":  # collective: every rank sends its shards, rank 0 gets them whole
            tensors, optim = _full_state(model, optimizer)
        if not d.main:
            return
        if mode != "fsdp":
            tensors, optim = _trained_state(model, config), optimizer.state_dict()
        if best:
            ckpt.atomic_torch_save({"model": tensors, "step": state.step}, ck_dir / ckpt.BEST)
        fault = "before-rename" if _fault("KILL_IN_SAVE") == state.step else None
        ckpt.atomic_torch_save({
            "model": tensors, "optimizer": optim,
            "scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(),
            "state": dataclasses.asdict(state), "config": config.to_dict(),
        }, ck_dir / ckpt.LAST, _fault=fault)

    def eval_and_checkpoint() -> None:
        result = run_eval(config.eval_batches)
        improved = False
        if result is not None:
            state.curves["val_loss"].append([state.step, result["loss"]])
            logger.scalars(state.step, {"val/loss": result["loss"]})
            improved = result["loss"] < state.best_val
            if improved:
                state.best_val, state.best_step = result["loss"], state.step
        save(best=improved)

    wrapped, mode = (_wrap(step_module, config, d, mode) if config.method != "none"
                     else (model, "eval"))
    record["env"]["parallel"] = mode
    # the steps' micro-batches in the run's data order (loralab.training.batching), read and collated
    # by the DataLoader: workers and pinned memory as loralab.devices decides for this device
    loading = device_defaults(d.device.type)
    micro_batches = iter(batching.training_loader(
        train_set if train_set is not None else [],
        batching.StepBatchSampler(len(train_set) if train_set is not None else 0, config.seed,
                                  config.batch_size, config.grad_accum, steps_per_epoch,
                                  state.epoch, state.step_in_epoch, total_steps - state.step),
        batching.StepCollate(collate, config.task, d.rank, d.world),
        workers=loading.loader_workers, pin_memory=loading.pin_memory)) \
        if state.step < total_steps else iter(())
    model.train()
    try:
        while state.step < total_steps:
            if state.step_in_epoch >= steps_per_epoch:
                state.epoch += 1
                state.step_in_epoch = 0
            if config.method == "lora-head" and phase == "lora" and state.step >= head_start:
                phase = "head"
                set_phase(model, config, phase)
                if d.world > 1:  # DDP registered the old trainable set; wrap again
                    wrapped, mode = _wrap(step_module, config, d, mode)
                logger.message(f"step {state.step}: adapters frozen, training the head only")
            t0 = time.perf_counter()
            micro = [next(micro_batches) for _ in range(config.grad_accum)]
            batches = [m["batch"] for m in micro]
            # every process knows the whole step: T_step needs no communication
            t_step = sum(m["targets"] for m in micro)
            step_tokens = sum(m["tokens"] for m in micro)
            step_loss = torch.zeros((), dtype=torch.float64)
            body_frozen = frozen_body(model, heads) if (
                config.method == "head" or phase == "head") else nullcontext()
            with body_frozen:
                for k, batch in enumerate(batches):
                    batch = _to(batch, d.device)
                    sync = k == len(batches) - 1 or mode not in ("ddp", "fsdp")
                    ctx = wrapped.no_sync() if not sync and mode == "ddp" else nullcontext()
                    if mode == "fsdp":  # no reduce-scatter until the step's last micro-batch
                        wrapped.set_requires_gradient_sync(sync)
                    with ctx, tracker.track(), _autocast(config, d.device):
                        if fused:
                            loss = wrapped(batch["input_ids"], batch.get("attention_mask"),
                                           batch["labels"]) / t_step
                        else:
                            logits = _forward_logits(wrapped, batch)
                            loss = loss_sum(logits, batch["labels"], config.task,
                                            config.label_smoothing) / t_step
                    (loss * d.world).backward()
                    step_loss += loss.detach().double().cpu()
            step_loss = float(_all_reduce_sum(step_loss, d))
            fault_nan = _fault("NAN_AT_STEP")
            if fault_nan is not None and state.step + 1 == fault_nan:
                step_loss = float("nan")
            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                         if config.grad_clip > 0 else torch.zeros(()))
            if mode == "fsdp" and hasattr(grad_norm, "full_tensor"):  # a DTensor over shards
                grad_norm = grad_norm.full_tensor()
            if not math.isfinite(step_loss) or not torch.isfinite(grad_norm):
                what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                value = step_loss if what == "loss" else float(grad_norm)
                kept = (f"the last good checkpoint is {ck_dir / ckpt.LAST}"
                        if (ck_dir / ckpt.LAST).exists() else "no checkpoint was written yet")
                raise TrainingDiverged(
                    f"training stopped: the {what} became {value} at step {state.step + 1}; "
                    f"{kept}; lower --lr, keep --grad-clip or use --precision fp32")
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if not static_bytes:
                static_bytes = measure.static_tensor_bytes(
                    *(_local_view(model, optimizer) if mode == "fsdp" else (model, optimizer)))
            state.step += 1
            state.step_in_epoch += 1
            state.tokens += step_tokens
            state.train_seconds += time.perf_counter() - t0
            if state.step == 1:
                state.first_tokens, state.first_seconds = state.tokens, state.train_seconds
            tps = state.tokens / max(state.train_seconds, 1e-9)
            state.curves["train_loss"].append([state.step, step_loss])
            state.curves["lr"].append([state.step, lr])
            rss = sampler.peak_delta if sampler is not None else 0
            state.peak_rss_delta = max(state.peak_rss_delta, rss)
            state.peak_saved_bytes = max(state.peak_saved_bytes, tracker.peak)
            logger.scalars(state.step, {"train/loss": step_loss, "train/lr": lr,
                                        "train/tokens_per_second": tps,
                                        "train/grad_norm": float(grad_norm),
                                        "memory/peak_rss_delta_bytes": state.peak_rss_delta})
            logger.progress(state.step, step_loss, lr, tps)
            at_epoch_end = state.step_in_epoch == steps_per_epoch
            if at_epoch_end or (config.eval_every and state.step % config.eval_every == 0) \
                    or state.step == total_steps:
                eval_and_checkpoint()
            elif config.checkpoint_every and state.step % config.checkpoint_every == 0:
                save()
            if _fault("KILL_AT_STEP") == state.step:
                os.kill(os.getpid(), signal.SIGKILL)
    except TrainingDiverged as exc:
        record["status"] = "failed"
        record["notes"] = notes + [str(exc)]
        record["curves"] = state.curves
        if d.main:
            ckpt.atomic_write_json(record_path, record)
        logger.close()
        if sampler is not None:
            sampler.stop()
        raise

    rss_delta = sampler.stop() if sampler is not None else 0
    if compiled:  # final evaluation and decoding run eagerly (no recompiles per KV-cache length)
        compiling.uncompile_blocks(model)
    state.peak_rss_delta = max(state.peak_rss_delta, rss_delta)
    state.peak_saved_bytes = max(state.peak_saved_bytes, tracker.peak)

    # final weights: the best validation checkpoint
    # (FSDP: every rank reads the file, once rank 0 has written it, and keeps its shards)
    if mode == "fsdp":
        _barrier(d)
    weights_step = state.step  # the step whose weights the final evaluation reads
    if (config.keep_best and (d.main or mode == "fsdp") and config.method != "none"
            and (ck_dir / ckpt.BEST).exists()):
        best = ckpt.load(ck_dir / ckpt.BEST)
        if best["step"] != state.step:
            weights_step = best["step"]
            if mode == "fsdp":
                _set_full_state(model, None, best["model"], None)
            else:
                _load_trained_state(model, best["model"])
            notes.append(f"weights of step {best['step']} restored (best validation loss)")

    metrics: dict = {}
    if d.main or mode == "fsdp":  # FSDP: every rank runs the forward, rank 0 records
        t0 = time.perf_counter()
        for name, ds in splits.items():
            if name == "train":
                continue
            # a complete evaluation of these weights, run eagerly, need not run twice
            # (compiled blocks evaluate with other kernels: then the final pass runs eagerly)
            reuse = complete_evals.get(weights_step) if name == val_name and not compiled \
                else None
            metrics[name] = dict(reuse) if reuse else evaluate(
                eval_net, ds, collate, config, d.device,
                progress=f"final evaluation, {name}" if d.main else None)
        for extra in config.eval_data:
            metrics[extra] = _evaluate_extra(eval_net, loaded, extra, config, d.device, d.main)
        state.eval_seconds += time.perf_counter() - t0
    whole = _full_state(model, None)[0] if mode == "fsdp" else None  # collective
    if d.main:
        artifacts = _save_artifact(model, loaded, config, out, whole)
        record["artifacts"].update(artifacts)

    # costs
    flop_costs, flop_estimates, flop_notes = _flop_costs(
        model, config, state, head_start / max(1, total_steps), d)
    notes += flop_notes
    artifact_bytes = sum(measure.path_bytes(p) for k, p in record["artifacts"].items()
                         if p and k != "tensorboard" and Path(p).exists())
    peak_memory = (measure.peak_cuda_bytes() if d.device.type == "cuda"
                   else state.peak_rss_delta)
    record["costs"].update({
        "artifact_bytes": artifact_bytes,
        "train_seconds": state.train_seconds, "eval_seconds": state.eval_seconds,
        "data_seconds": data_seconds,
        "tokens_per_second": _throughput(state),
        "first_step_seconds": state.first_seconds,
        "peak_memory_bytes": int(peak_memory),
        "peak_tensor_bytes": int(static_bytes + state.peak_saved_bytes),
    } | flop_costs)
    record["estimates"] = flop_estimates | {
        "tokens": state.tokens, "steps": state.step,
        "memory": measure.memory_estimate(
            *(_local_view(model, optimizer) if mode == "fsdp" else (model, optimizer)),
            state.peak_saved_bytes),
        "best_step": state.best_step,
    }
    if d.main and config.method in ("qat-lora", "qlora", "lora-ptq"):
        from loralab.quant import core as quant

        t0 = time.perf_counter()
        val = splits.get(val_name) if val_name else None
        batches = [collate([val[i] for i in range(s, min(len(val), s + config.batch_size))])
                   for s in range(0, min(len(val), 4 * config.batch_size), config.batch_size)
                   ] if val is not None else []
        metrics, record["quant"] = quant.finish_run(
            model, config.method, config.quant, metrics,
            lambda m: {n: evaluate(m, ds, collate, config, d.device)
                       for n, ds in splits.items() if n != "train"},
            [_to(b, d.device) for b in batches], out)
        q = record["quant"]
        record["artifacts"]["quantized_model"] = q["quantized_model"]
        record["costs"].update({"quantized_model_bytes": q["quantized_model_bytes"],
                                "deploy_seconds": time.perf_counter() - t0})
        if "latency" in q:
            record["costs"]["latency_ms"] = q["latency"]["merged"]["median_ms"]
    record.update(status="finished", metrics=metrics, curves=state.curves, notes=notes)
    if d.main:
        from loralab.training.tracking import final_values

        logger.close(_hparams(config), final_values(metrics, record["costs"]))
        ckpt.atomic_write_json(record_path, record)
    _barrier(d)
    return record


def _flop_costs(model: nn.Module, config: TrainConfig, state: _State, lora_fraction: float,
                d: Dist) -> tuple[dict, dict, list[str]]:
    """The record's training FLOPs, matmul peak and MFU: (costs, estimates, notes) entries.

    FLOPs per token follow `measure.flops_per_token` (lora-head mixes its phases by
    `lora_fraction`, the LoRA share of the steps); the estimates spell the formula out. MFU
    (`peak.run_mfu`) divides by the matmul peak at the model's own largest linear shapes with
    the run's micro-batch x seq_len rows, dtype and thread count, re-measured if the run beats
    it. Only rank 0 measures: other ranks timing at once would slow each other down."""
    from loralab.costs import peak as peaks
    from loralab.lora.layer import lora_parameters

    n_matmul = measure.matmul_parameters(model)
    kw = {"lora_params": sum(p.numel() for p in lora_parameters(model)),
          "head_params": sum(p.numel() for p in head_parameters(model))
          if config.method in ("head", "lora-head") else 0}
    if config.method == "lora-head":
        fpt = (lora_fraction * measure.flops_per_token("lora", n_matmul, **kw)
               + (1 - lora_fraction) * measure.flops_per_token("head", n_matmul, **kw))
    else:
        fpt = measure.flops_per_token(config.method, n_matmul, **kw)
    train_flops = fpt * state.tokens
    costs: dict = {"train_flops": train_flops, "mfu": 0.0}
    estimates: dict = {"flops_per_token": fpt, "flops_per_token_formula":
                       measure.flops_per_token_formula(config.method, n_matmul,
                                                       lora_fraction=lora_fraction, **kw),
                       "matmul_params": n_matmul, "peak_flops_per_second": 0.0, "peak": None}
    if config.method == "none" or not d.main or state.train_seconds <= 0:
        return costs, estimates, []
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    shapes = peaks.matmul_shapes(model, config.batch_size // d.world * config.seq_len,
                                 str(d.device))
    mfu_costs, peak_estimates, notes = peaks.run_mfu(
        shapes, dtype, str(d.device), train_flops, state.train_seconds, fpt * _throughput(state))
    return costs | mfu_costs, estimates | peak_estimates, notes


def _throughput(state: _State) -> float:
    """Steady-state tokens/s: after the first optimizer step when there are several (the first
    step pays one-off costs: lazy imports, kernel selection, allocator warm-up)."""
    tokens, seconds = state.tokens, state.train_seconds
    if state.step >= 2 and state.first_seconds:
        tokens, seconds = tokens - state.first_tokens, seconds - state.first_seconds
    return tokens / seconds if seconds > 0 else 0.0


def _evaluate_extra(model: nn.Module, loaded: Any, name: str, config: TrainConfig,
                    device: torch.device, show: bool = False) -> dict:
    from loralab.data.tasks import load_task_data

    extra = load_task_data(name, config.task, loaded.tokenizer, seq_len=config.seq_len,
                           seed=config.seed)
    split = "test" if "test" in extra.splits else "validation"
    data = _bounded_splits({split: extra.splits[split]}, config.eval_max_examples)[split]
    return evaluate(model, data, extra.collate_fn, config, device,
                    progress=f"final evaluation, {name}" if show else None)


def _bounded_splits(splits: dict, n: int) -> dict:
    """Every split but train cut to `n` examples (0 = all): the fixed seed-0 subset a study's
    eval_max_examples takes (`data.subsample`), so a bounded run scores the same examples."""
    if not n:
        return splits
    return {k: v if k == "train" else subsample(v, n) for k, v in splits.items()}


def _final_eval_plan(splits: dict, config: TrainConfig) -> str:
    """What the final evaluation will cover, said before training starts: it runs every
    evaluation example once more after the last step, and on a quick run that can take far
    longer than the training itself (issue 23: 20 s of training, then 307 s of evaluation)."""
    bs = eval_batch_size(config)
    parts = [f"{name} {len(ds):,} examples ({-(-len(ds) // bs):,} x {bs}-row batches)"
             for name, ds in splits.items() if name != "train"]
    parts += [f"{name} (eval_data)" for name in config.eval_data]
    if not parts:
        return "final evaluation: none (no evaluation split)"
    bound = (f"bounded by eval_max_examples={config.eval_max_examples}"
             if config.eval_max_examples else
             "every example; --eval-max-examples N bounds it for a quick run")
    return f"final evaluation after training: {', '.join(parts)}; {bound}"


# --- evaluating a finished run or a model + adapter ----------------------------------------------

def evaluate_saved(*, run_dir: str | os.PathLike | None = None, model: str | None = None,
                   adapter: str | os.PathLike | None = None, data: str | None = None,
                   task: str | None = None, splits: tuple[str, ...] = (),
                   batch_size: int | None = None, seq_len: int | None = None,
                   num_labels: int | None = None, precision: str | None = None) -> dict:
    """Metrics of a finished run (its saved model, adapter or head) or of `model` (+ `adapter`)
    on `data` (default: the run's dataset), per split: {split: {loss, perplexity | accuracy,
    precision, recall, f1, ...}}. The precision is `precision`, else the one the run computed
    in (its record's env), else the one it asked for; auto resolves for this machine."""
    from loralab.data.tasks import load_task_data

    if run_dir is not None:
        from loralab.study.runner import load_run, load_run_model

        record = load_run(run_dir)
        values = {k: v for k, v in (record.get("config") or {}).items() if k in config_fields()}
        # the precision the run computed in (its env), so re-evaluation reproduces its metrics
        computed = (record.get("env") or {}).get("precision")
        config = make_config(values, data=data, batch_size=batch_size, seq_len=seq_len,
                             precision=precision or computed)
        net, tokenizer, _ = load_run_model(run_dir)
    else:
        if model is None or data is None or task is None:
            raise UserError("pass a run directory, or --model, --task and --data (and "
                            "optionally --adapter)")
        from loralab.models.loading import load_model

        config = make_config(model=model, task=task, data=data, method="none",
                             batch_size=batch_size, seq_len=seq_len, num_labels=num_labels,
                             precision=precision)
        loaded = load_model(model, task, num_labels=config.num_labels)
        net, tokenizer = loaded.model, loaded.tokenizer
        if adapter is not None:
            from loralab.lora.adapter import load_adapter

            load_adapter(net, adapter)
    task_data = load_task_data(config.data, config.task, tokenizer, seq_len=config.seq_len,
                               seed=config.seed)
    wanted = splits or tuple(s for s in task_data.splits if s != "train")
    missing = [s for s in wanted if s not in task_data.splits]
    if missing:
        raise UserError(f"{config.data} has no split {missing[0]!r}; it has "
                        f"{', '.join(task_data.splits)}")
    net.eval()
    config = with_resolved_precision(config, "cpu")  # evaluate() runs on its default device
    return {s: evaluate(net, task_data.splits[s], task_data.collate_fn, config,
                        progress=f"evaluation, {s}")
            for s in wanted}
