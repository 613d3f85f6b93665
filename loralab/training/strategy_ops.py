"""What each fine-tuning method trains, checkpoints, saves and counts (the strategies' operations)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from loralab.costs import measure
from loralab.devices import device_defaults
from loralab.errors import UserError
from loralab.kernels.attention import use_dropout_attention
from loralab.kernels.lean_mlp import lean_mlps
from loralab.lora.dropout import seeded_dropouts
from loralab.models.loading import head_parameters, task_head_modules, untie_head
from loralab.training.batching import epoch_order, target_count  # noqa: F401  (epoch_order re-exported)
from loralab.training.config import LORA_METHODS, TrainConfig
from loralab.training.distributed import Dist
from loralab.training.state import LoopState, throughput


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


def _flop_costs(model: nn.Module, config: TrainConfig, state: LoopState, lora_fraction: float,
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
        shapes, dtype, str(d.device), train_flops, state.train_seconds, fpt * throughput(state))
    return costs | mfu_costs, estimates | peak_estimates, notes
