"""One training loop for every strategy, with cost measurement, logging, resume, DDP and FSDP.

`train(config)` runs one job: the strategy (`loralab.training.strategies`, chosen by
`config.method` through the registry) prepares the model and says what trains, checkpoints,
saves and counts; the distribution (`loralab.training.distributed`: one process, DDP or FSDP)
says how the work is spread; this module only orders the steps:

    set-up        run directory, precision, model + data, strategy, schedule, optimizer, resume
    steps         `step.optimizer_step`: the micro-batches of one optimizer step
    evaluation    periodic (`evaluate.Evaluator`), with checkpoints and best-step selection
    final         best weights restored, final evaluation, artefacts, the strategy's finish
    record        costs (`state.run_costs`, the strategy's FLOPs), then `record.RecordWriter`

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
DDP and FSDP average gradients over ranks), so accumulation gives exactly the gradient of L.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from loralab.costs import measure
from loralab.data.tasks import load_task_data
from loralab.devices import device_defaults
from loralab.errors import UserError
from loralab.kernels import compiling
from loralab.models.loading import Task, load_model
from loralab.quant import count_parameters
from loralab.training import batching
from loralab.training import checkpoint as ckpt
from loralab.training.config import TrainConfig
from loralab.training.distributed import Distribution, distribution_for
from loralab.training.evaluate import Evaluator, bounded_splits, final_eval_plan
from loralab.training.logger import Logger, hparams
from loralab.training.optim import lr_factor, make_optimizer, param_groups
from loralab.training.precision import precision_note, resolve_precision
from loralab.training.record import ExtraResults, Record, RecordWriter, read_record
from loralab.training.state import LoopState, MemoryWatch, run_costs, throughput
from loralab.training.step import (
    StepResult,
    TrainingDiverged,
    optimizer_step,
    step_module,
    to_device,
)
from loralab.training.strategies.base import Strategy, frozen_body, strategy_for
from loralab.training.tracking import final_values

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["TrainingDiverged", "load_pieces", "train"]

AfterEvaluation = Callable[[nn.Module, Any, dict], ExtraResults]
"""(model, tokenizer, record as a dict) -> what to add to the record (rank 0, after the final
evaluation and the strategy's finish)."""


def load_pieces(config: TrainConfig) -> tuple[Any, Any, float]:
    """(loaded model, task data, data preparation seconds) via loralab.models.loading and
    loralab.data.tasks."""
    task = cast(Task, config.task)  # TrainConfig checks it is one of TASKS
    loaded = load_model(config.model, task, num_labels=config.num_labels)
    t0 = time.perf_counter()
    data = load_task_data(config.data, config.task, loaded.tokenizer, seq_len=config.seq_len,
                          data_fraction=config.data_fraction, seed=config.seed)
    return loaded, data, time.perf_counter() - t0


@dataclass(frozen=True)
class Schedule:
    """The run's steps: optimizer steps per epoch and in all, the first head-only step
    (`total` without such a phase) and the warm-up steps."""

    per_epoch: int
    total: int
    head_start: int
    warmup: int


def _schedule(config: TrainConfig, strategy: Strategy, train_set: Any) -> Schedule:
    """Raises UserError when the train split is smaller than one global batch."""
    global_batch = config.batch_size * config.grad_accum
    per_epoch = len(train_set) // global_batch if train_set is not None else 0
    if strategy.spec.trains and per_epoch == 0:
        raise UserError(f"the train split has {len(train_set)} examples, fewer than one global "
                        f"batch ({global_batch}); lower --batch-size or --grad-accum")
    total = (0 if not strategy.spec.trains else config.max_steps
             or max(1, round(config.epochs * per_epoch)))
    return Schedule(per_epoch, total, strategy.head_start(total, per_epoch),
                    config.warmup_steps or round(config.warmup_ratio * total))


def _start(config: TrainConfig, out: Path, resume: bool, dist: Distribution
           ) -> tuple[Record | None, TrainConfig, str | None]:
    """(the record of the run being resumed or None, the config with its precision resolved,
    why auto resolved as it did). A resumed run keeps the precision it started in. Raises
    UserError when `out` holds a run and `resume` is off."""
    in_use = (out / "record.json").exists() or (out / "checkpoints" / ckpt.LAST).exists()
    if in_use and not resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose "
                        "another --out")
    previous = read_record(out) if resume else None
    requested = config.precision
    kept = (previous.env.get("precision") if previous is not None and requested == "auto"
            else None)
    resolved = kept if kept in ("fp32", "bf16") else resolve_precision(requested, dist.device)
    why = (f"precision auto -> {resolved}: kept from the run's start" if kept == resolved
           else precision_note(requested, resolved, dist.device))
    return previous, dataclasses.replace(config, precision=resolved), why


def _prepare(model: nn.Module, strategy: Strategy, config: TrainConfig,
             dist: Distribution) -> list[str]:
    """The strategy's surgery, the model on the device, gradient checkpointing; notes."""
    notes = strategy.prepare(model, dist.device.type)
    model.to(dist.device)
    if config.grad_checkpointing and strategy.spec.trains:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise UserError("this model does not support gradient checkpointing")
        hf = cast("PreTrainedModel", model)  # a transformers model: it has the method
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            hf.config.use_cache = False
    return notes


def _optimizer(model: nn.Module, strategy: Strategy, config: TrainConfig, schedule: Schedule,
               device: torch.device) -> tuple[Any, Any]:
    """(AdamW, its LambdaLR schedule), or (None, None) when nothing trains. Every parameter
    that may ever train is in the optimizer; AdamW skips those whose grad is None, so phases
    share one optimizer and schedule. With LoRA+ (`lr_ratio`) B's groups start at lr_ratio x
    lr (`optim.param_groups`); the schedule's factor scales every group's own initial lr."""
    if not strategy.spec.trains:
        return None, None
    phase = strategy.phase_at(0, schedule.head_start)
    strategy.set_phase(model, phase)
    for p in strategy.trainable_parameters(model):
        p.requires_grad_(True)
    groups = param_groups(model, config.weight_decay, config.lr, config.lr_ratio,
                          strategy.lora_factors(model))
    optimizer = make_optimizer(groups, config.lr, device)
    strategy.set_phase(model, phase)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, schedule.total, schedule.warmup, config.schedule))


class Checkpoints:
    """The run's checkpoints in `out/checkpoints`: `last.pt` (everything to resume) and
    `best.pt` (the weights of the best validation loss so far). Gathering is collective
    (FSDP); only the writing process writes."""

    def __init__(self, out: Path, model: nn.Module, optimizer: Any, scheduler: Any,
                 strategy: Strategy, config: TrainConfig, dist: Distribution) -> None:
        self.dir = out / "checkpoints"
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.strategy, self.config, self.dist = strategy, config, dist

    @property
    def last(self) -> Path:
        return self.dir / ckpt.LAST

    def save(self, state: LoopState, best: bool = False) -> None:
        gathered = self.dist.gather_state(self.model, self.optimizer,
                                          self.strategy.trained_state)
        if gathered is None:
            return
        tensors, optim = gathered
        if best:
            ckpt.atomic_torch_save({"model": tensors, "step": state.step}, self.dir / ckpt.BEST)
        fault = "before-rename" if ckpt.injected_fault("KILL_IN_SAVE") == state.step else None
        ckpt.atomic_torch_save({
            "model": tensors, "optimizer": optim,
            "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state(),
            "state": dataclasses.asdict(state), "config": self.config.to_dict(),
        }, self.last, _fault=fault)

    def resume(self) -> LoopState:
        """Restore model, optimizer, schedule and RNG from `last.pt`; the loop's state."""
        saved = ckpt.load(self.last)
        self.dist.restore_state(self.model, self.optimizer, saved["model"], saved["optimizer"],
                                self.strategy.load_trained_state)
        self.scheduler.load_state_dict(saved["scheduler"])
        ckpt.set_rng_state(saved["rng"])
        return LoopState(**saved["state"])

    def restore_best(self, step: int) -> int:
        """Load the best checkpoint's weights (`keep_best`, on the processes that evaluate)
        when they are not those of `step`; returns the step of the weights now loaded."""
        if not (self.config.keep_best and self.dist.evaluates and self.strategy.spec.trains
                and (self.dir / ckpt.BEST).exists()):
            return step
        best = ckpt.load(self.dir / ckpt.BEST)
        if best["step"] == step:
            return step
        self.dist.restore_state(self.model, None, best["model"], None,
                                self.strategy.load_trained_state)
        return best["step"]

    def kept(self) -> str:
        return (f"the last good checkpoint is {self.last}" if self.last.exists()
                else "no checkpoint was written yet")


def train(config: TrainConfig, *, resume: bool = False, loaded: Any = None,
          task_data: Any = None, extra_costs: Mapping[str, Any] | None = None,
          after_evaluation: AfterEvaluation | None = None) -> dict:
    """Run one training job and return its record (also written to `out/record.json`).

    `loaded` (with `.model`, `.tokenizer`) and `task_data` (with `.splits`, `.collate_fn`) may
    be passed in to train objects built elsewhere (tests, studies); they are otherwise made
    from the config with loralab.models.loading / loralab.data.tasks. `extra_costs` (e.g. a
    study's load_seconds) are merged into the record's costs at the end; `after_evaluation`
    runs on rank 0 after the final evaluation and the strategy's finish, and what it returns
    (`record.ExtraResults`) is merged into the record and reaches the trackers' final values.
    A resumed run that had finished returns its record as it is. Raises UserError for a run
    directory in use or data that cannot fill a step, TrainingDiverged for a NaN/inf loss.
    """
    dist = distribution_for(config)
    out, requested = Path(config.out), config.precision
    previous, config, precision_why = _start(config, out, resume, dist)
    if previous is not None and previous.status == "finished":
        return previous.to_dict()
    dist.barrier()  # every process has checked the run directory before rank 0 writes to it
    ckpt.seed_everything(config.seed)
    data_seconds = 0.0
    if loaded is None or task_data is None:
        loaded, task_data, data_seconds = load_pieces(config)
    model: nn.Module = loaded.model
    strategy = strategy_for(config)
    notes = list(getattr(loaded, "notes", ())) + _prepare(model, strategy, config, dist)
    if strategy.spec.trains and not strategy.trainable_parameters(model):
        raise UserError(f"method {config.method!r} leaves no parameter of {config.model} "
                        "trainable (e.g. it has no biases); choose another method or model")
    splits = bounded_splits(task_data.splits, config.eval_max_examples)
    if "train" not in splits and strategy.spec.trains:
        raise UserError(f"dataset {config.data} has no train split")
    record = _new_record(config, requested, previous, model, dist,
                         notes + ([precision_why] if precision_why else []))
    notes, writer = record.notes, RecordWriter(out / "record.json", dist.main)
    writer.write(record)
    dist.check_shared(out / "record.json")  # every node reads the checkpoints

    schedule = _schedule(config, strategy, splits.get("train"))
    notes += [n for n in [strategy.phase_note(schedule.head_start, schedule.total)] if n]
    compiled = _compile(model, strategy, schedule, dist, record)
    loss_module = step_module(model, config, dist.dist)
    prepared = dist.prepare(model, loss_module)  # before the optimizer: FSDP shards here
    optimizer, scheduler = _optimizer(model, strategy, config, schedule, dist.device)
    checkpoints = Checkpoints(out, model, optimizer, scheduler, strategy, config, dist)
    state = checkpoints.resume() if resume and checkpoints.last.exists() else LoopState()
    if state.step:
        notes.append(f"resumed from step {state.step}")
    record.curves = state.curves
    phase = strategy.phase_at(state.step, schedule.head_start)
    strategy.set_phase(model, phase)

    logger = _open_logger(config, schedule, state, record, splits, dist)
    evaluator = Evaluator(dist.eval_module(model, prepared), splits, task_data.collate_fn,
                          config, dist, state)
    watch = MemoryWatch(dist.saved_tensor_tracker(model, prepared), dist.device, dist.main)
    wrapped = dist.wrap(prepared)
    record.env["parallel"] = dist.name
    micro_batches = _micro_batches(splits.get("train"), task_data.collate_fn, config, dist,
                                   schedule, state)
    heads = strategy.no_grad_heads(model)
    model.train()
    try:
        while state.step < schedule.total:
            if state.step_in_epoch >= schedule.per_epoch:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            if strategy.phase_at(state.step, schedule.head_start) != phase:
                phase = strategy.phase_at(state.step, schedule.head_start)
                strategy.set_phase(model, phase)
                wrapped = dist.wrap(prepared)  # DDP registered the old trainable set
                logger.message(f"step {state.step}: adapters frozen, training the head only")
            t0 = time.perf_counter()
            body = frozen_body(model, heads) if strategy.body_frozen(phase) else None
            result = optimizer_step(
                state.step + 1, [next(micro_batches) for _ in range(config.grad_accum)],
                wrapped, loss_module is not model,
                [p for p in model.parameters() if p.requires_grad], optimizer, scheduler,
                config, dist, watch.tracker, body, checkpoints.kept())
            watch.after_step(state, lambda: dist.local_view(model, optimizer))
            _advance(state, result, time.perf_counter() - t0, logger)
            if (state.step_in_epoch == schedule.per_epoch or state.step == schedule.total
                    or (config.eval_every and state.step % config.eval_every == 0)):
                _evaluate_and_save(evaluator, checkpoints, state, logger, config)
            elif config.checkpoint_every and state.step % config.checkpoint_every == 0:
                checkpoints.save(state)
            if ckpt.injected_fault("KILL_AT_STEP") == state.step:
                os.kill(os.getpid(), signal.SIGKILL)
    except TrainingDiverged as exc:
        record.status, record.notes, record.curves = "failed", notes + [str(exc)], state.curves
        writer.write(record)
        logger.close()
        watch.stop(state)
        raise

    watch.stop(state)
    if compiled:  # final evaluation and decoding run eagerly (no recompiles per KV-cache length)
        compiling.uncompile_blocks(model)
    dist.barrier()  # FSDP: every rank reads the best checkpoint once rank 0 has written it
    weights_step = checkpoints.restore_best(state.step)  # the weights evaluated finally
    if weights_step != state.step:
        notes.append(f"weights of step {weights_step} restored (best validation loss)")
    metrics = evaluator.final(weights_step, getattr(loaded, "tokenizer", None), reuse=not compiled)
    whole = dist.whole_model_state(model)  # collective under FSDP
    if dist.main:
        record.artifacts.update(strategy.save_artifact(model, loaded, out, whole))
    _add_costs(record, strategy, model, optimizer, state, watch, schedule, dist, data_seconds)
    if dist.main:
        metrics = _finish(strategy, model, metrics, evaluator, record, out)
    record.costs.update(extra_costs or {})
    record.status, record.metrics, record.curves = "finished", metrics, state.curves
    if dist.main:
        if after_evaluation is not None:
            record.add(after_evaluation(model, getattr(loaded, "tokenizer", None),
                                        record.to_dict()))
        logger.close(hparams(config), final_values(record.metrics, record.costs))
        writer.write(record)
    dist.barrier()
    return record.to_dict()


def _compile(model: nn.Module, strategy: Strategy, schedule: Schedule, dist: Distribution,
             record: Record) -> bool:
    """Compile the model's blocks when `kernels.compiling.should_compile` says so and the
    distribution allows it (FSDP runs eager); whether it did (record env and notes)."""
    config = strategy.config
    compiled, why = compiling.should_compile(
        config.compile, trains=strategy.spec.trains, total_steps=schedule.total,
        tokens_per_step=config.batch_size * config.grad_accum * config.seq_len,
        params=record.costs["total_params"])
    compiled = compiled and dist.allows_compile
    if compiled:
        compiling.compile_blocks(model)
        record.notes.append(why)
    record.env["compiled"] = compiled
    return compiled


def _new_record(config: TrainConfig, requested: str, previous: Record | None,
                model: nn.Module, dist: Distribution, notes: list[str]) -> Record:
    """The record of a starting run: `config` with the precision as asked (`requested`), env
    with the one computed in; the run_id of the run being resumed, else a new one."""
    out = Path(config.out)
    trainable, total = count_parameters(model)
    return Record(
        previous.run_id if previous is not None else f"{out.name}-{uuid.uuid4().hex[:8]}",
        "running", config.to_dict() | {"precision": requested},
        costs={"trainable_params": trainable, "total_params": total,
               "trainable_pct": 100.0 * trainable / max(1, total)},
        artifacts={"adapter": None, "model": None, "head": None, "tensorboard": str(out / "tb")},
        env=measure.environment(str(dist.device)) | {"world_size": dist.world,
                                                     "precision": config.precision},
        notes=notes)


def _open_logger(config: TrainConfig, schedule: Schedule, state: LoopState, record: Record,
                 splits: dict, dist: Distribution) -> Logger:
    """The run's trackers and progress display (where they live goes into the record), with
    what the final evaluation will cover and, for emulated bf16, a warning (also a note)."""
    logger = Logger(config, Path(config.out), schedule.total, state.step, record.run_id,
                    dist.main)
    record.tracking = logger.reopen
    logger.message(final_eval_plan(splits, config))
    if config.precision == "bf16" and not measure.native_bf16(dist.device):
        record.notes.append(
            f"bf16 on this {dist.device.type} is emulated (no AVX512-BF16/AMX or bf16 GPU): "
            "steps run several times slower than fp32; --precision fp32 is faster here")
        logger.message(record.notes[-1])
    return logger


def _add_costs(record: Record, strategy: Strategy, model: nn.Module, optimizer: Any,
               state: LoopState, watch: MemoryWatch, schedule: Schedule, dist: Distribution,
               data_seconds: float) -> None:
    """The finished run's costs and estimates: measured (`state.run_costs`), the strategy's
    FLOPs and MFU (phases weighted by their shares of the steps), the memory breakdown."""
    config = strategy.config
    flop_costs, flop_estimates, flop_notes = strategy.flop_costs(
        model, tokens=state.tokens, train_seconds=state.train_seconds,
        tokens_per_second=throughput(state),
        lora_fraction=schedule.head_start / max(1, schedule.total),
        rows=config.batch_size // dist.world * config.seq_len, device=dist.device,
        measure_peak=dist.main)
    record.notes += flop_notes
    record.costs.update(run_costs(state, watch, record.artifacts, data_seconds) | flop_costs)
    record.estimates = flop_estimates | {
        "tokens": state.tokens, "steps": state.step,
        "memory": measure.memory_estimate(*dist.local_view(model, optimizer),
                                          state.peak_saved_bytes),
        "best_step": state.best_step}


def _micro_batches(train_set: Any, collate: Callable, config: TrainConfig, dist: Distribution,
                   schedule: Schedule, state: LoopState) -> Any:
    """The steps' micro-batches from `state`'s position on, in the run's data order
    (loralab.training.batching), read and collated by a DataLoader with the workers and pinned
    memory loralab.devices decides for this device."""
    if state.step >= schedule.total:
        return iter(())
    loading = device_defaults(dist.device.type)
    return iter(batching.training_loader(
        train_set,
        batching.StepBatchSampler(len(train_set), config.seed, config.batch_size,
                                  config.grad_accum, schedule.per_epoch, state.epoch,
                                  state.step_in_epoch, schedule.total - state.step),
        batching.StepCollate(collate, config.task, dist.rank, dist.world),
        workers=loading.loader_workers, pin_memory=loading.pin_memory))


def _advance(state: LoopState, result: StepResult, seconds: float, logger: Logger) -> None:
    """Count a finished optimizer step into the loop's state and curves, and log it."""
    state.step += 1
    state.step_in_epoch += 1
    state.tokens += result.tokens
    state.train_seconds += seconds
    if state.step == 1:
        state.first_tokens, state.first_seconds = state.tokens, state.train_seconds
    state.curves["train_loss"].append([state.step, result.loss])
    state.curves["lr"].append([state.step, result.lr])
    tps = state.tokens / max(state.train_seconds, 1e-9)
    logger.scalars(state.step, {"train/loss": result.loss, "train/lr": result.lr,
                                "train/tokens_per_second": tps,
                                "train/grad_norm": result.grad_norm,
                                "memory/peak_rss_delta_bytes": state.peak_rss_delta})
    logger.progress(state.step, result.loss, result.lr, tps)


def _evaluate_and_save(evaluator: Evaluator, checkpoints: Checkpoints, state: LoopState,
                       logger: Logger, config: TrainConfig) -> None:
    """A periodic evaluation (on the processes that evaluate), then a checkpoint, marked best
    when the validation loss improved."""
    result = evaluator.periodic(config.eval_batches)
    improved = False
    if result is not None:
        state.curves["val_loss"].append([state.step, result["loss"]])
        logger.scalars(state.step, {"val/loss": result["loss"]})
        improved = result["loss"] < state.best_val
        if improved:
            state.best_val, state.best_step = result["loss"], state.step
    checkpoints.save(state, best=improved)


def _finish(strategy: Strategy, model: nn.Module, metrics: dict, evaluator: Evaluator,
            record: Record, out: Path) -> dict:
    """The strategy's finish (quantized strategies deploy); its "quant" section, artefact and
    costs go into the record. Returns the metrics to record."""
    config, t0 = evaluator.config, time.perf_counter()
    val = evaluator.splits.get(evaluator.val_name) if evaluator.val_name else None
    batches = [evaluator.collate([val[i] for i in range(s, min(len(val), s + config.batch_size))])
               for s in range(0, min(len(val), 4 * config.batch_size), config.batch_size)
               ] if val is not None else []
    metrics, quant = strategy.finish(model, metrics, evaluator.all_splits,
                                     [to_device(b, evaluator.dist.device) for b in batches], out)
    if quant is not None:
        record.quant = quant
        record.artifacts["quantized_model"] = quant["quantized_model"]
        record.costs.update({"quantized_model_bytes": quant["quantized_model_bytes"],
                             "deploy_seconds": time.perf_counter() - t0})
        if "latency" in quant:
            record.costs["latency_ms"] = quant["latency"]["merged"]["median_ms"]
    return metrics
