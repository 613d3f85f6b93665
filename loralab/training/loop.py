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
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralab.costs import measure
from loralab.devices import device_defaults
from loralab.errors import UserError
from loralab.kernels import compiling
from loralab.models.loading import task_head_modules
from loralab.training import batching
from loralab.training import checkpoint as ckpt
from loralab.training.batching import epoch_order, target_count  # noqa: F401  (epoch_order re-exported)
from loralab.training.config import TrainConfig
from loralab.training.distributed import (
    _all_reduce_sum,
    _barrier,
    _full_state,
    _local_view,
    _parallel_mode,
    _set_full_state,
    _shard,
    _skip_gathered,
    _wrap,
    setup_distributed,
)
from loralab.training.evaluate import (
    _bounded_splits,
    _evaluate_extra,
    _final_eval_plan,
    eval_batch_size,
    evaluate,
)
from loralab.training.logger import Logger, _hparams
from loralab.training.optim import decay_groups, lr_factor, make_optimizer
from loralab.training.precision import _autocast, precision_note, resolve_precision
from loralab.training.state import LoopState, throughput
from loralab.training.step import _forward_logits, _step_module, _to, loss_sum
from loralab.training.strategy_ops import (
    _ever_trainable,
    _flop_costs,
    _load_trained_state,
    _save_artifact,
    _trained_state,
    frozen_body,
    prepare_model,
    set_phase,
)


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


# --- building a config from YAML + overrides ---------------------------------------------------


# --- distributed ---------------------------------------------------------------------------


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


# --- evaluation ---------------------------------------------------------------------------


# --- logging ------------------------------------------------------------------------------


# --- the run ------------------------------------------------------------------------------

def _fault(name: str) -> int | None:
    """Test hooks (fault injection): LORALAB_FAULT_<NAME>=step."""
    value = os.environ.get(f"LORALAB_FAULT_{name}")
    return int(value) if value else None


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
    state = LoopState()
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
        state = LoopState(**saved["state"])
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
        "tokens_per_second": throughput(state),
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


