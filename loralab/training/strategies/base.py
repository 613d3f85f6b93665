"""The fine-tuning strategy protocol: what a method does to the model, what it trains,
checkpoints, saves and counts, and what it does after training.

A strategy is one object per run, `Strategy(spec, config)`, made by `strategy_for(config)`
from the registry (`registry.get_spec(config.method).load()`). The training loop calls its
methods in this order and never looks at the method's name:

    prepare(model, device_type)        model surgery; returns notes for the record
    trainable_parameters(model)        every parameter that may ever train (the optimizer's)
    head_start / phase_at / set_phase  phases (LoRA, then the head alone), body_frozen, heads
    trained_state / load_trained_state what a checkpoint holds of the model
    save_artifact(model, loaded, out)  the adapter, the head or the whole model
    flop_costs(...)                    training FLOPs per token (formula in the record), MFU
    finish(model, metrics, ...)        deploy quantized (quantized strategies)

and a finished run's model is rebuilt with `rebuild_recorded` / `float_export`.

The defaults here are those of a strategy that trains whatever `make_trainable` leaves with
requires_grad, checkpoints exactly those tensors and saves nothing; subclasses override what
differs. Adding a method: a subclass in a new file plus one line in `registry.STRATEGIES`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from loralab.costs import measure
from loralab.costs import peak as peaks
from loralab.devices import device_defaults
from loralab.errors import UserError
from loralab.kernels.attention import use_dropout_attention
from loralab.kernels.lean_mlp import lean_mlps
from loralab.lora.adapter import load_adapter
from loralab.lora.dropout import seeded_dropouts
from loralab.lora.inject import has_lora, lora_modules, lora_parameters, merge_lora
from loralab.models.heads import describe_head, head_parameters, task_head_modules
from loralab.training.config import TrainConfig
from loralab.training.strategies.registry import StrategySpec, get_spec

Evaluate = Callable[[nn.Module], dict[str, dict]]
"""model -> {eval set: metrics}."""

TRAIN = "train"
"""The one phase of a strategy without phases."""


class Strategy:
    """One fine-tuning method's behaviour, for one run (`config`). See the module docstring."""

    cpu_speedups: ClassVar[bool] = False
    """Install the CPU-measured speed-ups (lean MLPs, seeded dropout, seeded-dropout
    attention) where `devices.device_defaults` allows them: for runs that back-propagate
    through the body (full fine-tuning, LoRA)."""
    trains_all: ClassVar[bool] = False
    """Every weight trains: 6 N FLOPs per token, and a checkpoint holds the whole state dict."""
    body_backward: ClassVar[bool] = True
    """The gradient flows back through the body (to adapters in it): 4 N + 6 A FLOPs per token;
    otherwise only the head trains and the body runs forward only: 2 N + 4 N_head."""

    def __init__(self, spec: StrategySpec, config: TrainConfig) -> None:
        self.spec = spec
        self.config = config

    @property
    def name(self) -> str:
        return self.spec.name

    # --- the model ------------------------------------------------------------------------

    def prepare_base(self, model: nn.Module) -> list[str]:
        """Change the base model before the trainable set is chosen (quantize it, untie the
        head); returns notes. Default: nothing."""
        return []

    def make_trainable(self, model: nn.Module) -> None:
        """Set requires_grad on exactly the parameters that train (adding adapters if any)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, device_type: str = "cpu") -> list[str]:
        """Make exactly the strategy's parameters trainable (in place). Returns notes.

        `device_type` is where the run trains: the CPU-measured speed-ups are installed only
        where `devices.device_defaults` allows them, so on CUDA the model keeps SDPA (flash /
        memory-efficient) and nn.Dropout."""
        notes = self.prepare_base(model)
        self.make_trainable(model)
        if self.cpu_speedups:
            install_speedups(model, device_type)
        note = self.head_note(model)
        return notes + ([note] if note else [])

    def head_note(self, model: nn.Module) -> str | None:
        """What the run does with the task head, read from which head parameters require grad
        (never inferred from the method's name), e.g. `task head trained fully: pre_classifier
        (Linear, 4,160 parameters) + classifier (Linear, 130 parameters)`, and the head
        modules that stay frozen."""
        own = {id(p) for p in head_parameters(model)}
        kinds: dict[str, list[str]] = {"trained fully": [], "partly trained": [], "frozen": []}
        for name, head in task_head_modules(model).items():
            grads = [p.requires_grad for p in head.parameters() if id(p) in own]
            kind = "trained fully" if grads and all(grads) else (
                "partly trained" if any(grads) else "frozen")
            kinds[kind].append(name)
        when = self.head_phase_words()
        parts = [f"{kind}{when if kind != 'frozen' else ''}: {describe_head(model, names)}"
                 for kind, names in kinds.items() if names]
        return "task head " + "; ".join(parts)

    def head_phase_words(self) -> str:
        """Words after "trained" in the head note when the head trains in a phase of its own."""
        return ""

    # --- training -------------------------------------------------------------------------

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every parameter that may ever train, all in the one optimizer (AdamW skips those
        whose grad is None, so phases share one optimizer and schedule)."""
        return [p for p in model.parameters() if p.requires_grad]

    def lora_factors(self, model: nn.Module
                     ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(every LoRA A, every LoRA B) of the model, by object: LoRA+ gives B its own rate
        (`optim.param_groups`). Default: loralab's LoRA layers (none for non-LoRA methods)."""
        layers = [m for _, m in lora_modules(model)]
        return [m.lora_A for m in layers], [m.lora_B for m in layers]

    def head_start(self, total_steps: int, steps_per_epoch: int) -> int:
        """The first step of the head-only phase; `total_steps` when there is none."""
        return total_steps

    def phase_note(self, head_start: int, total_steps: int) -> str | None:
        """A note on the phases for the record, or None."""
        return None

    def phase_at(self, step: int, head_start: int) -> str:
        """The phase step `step` (0-based, optimizer steps done so far) trains in."""
        return TRAIN

    def set_phase(self, model: nn.Module, phase: str) -> None:
        """Switch what trains to `phase`'s set (requires_grad). Default: one phase, no-op."""

    def body_frozen(self, phase: str) -> bool:
        """Whether the body runs under no_grad in `phase` (`frozen_body` with `no_grad_heads`)."""
        return False

    def no_grad_heads(self, model: nn.Module) -> list[nn.Module]:
        """The head modules where grad resumes when the body runs under no_grad."""
        return []

    # --- checkpoints and artefacts -----------------------------------------------------------

    def trained_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the model: the tensors that can train (adapters,
        head), cloned to CPU."""
        names = {id(p): n for n, p in model.named_parameters()}
        keep = {names[id(p)] for p in self.trainable_parameters(model)}
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keep}

    def load_trained_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Load `trained_state` tensors into the model. Raises UserError if a tensor has no
        place in it (a checkpoint of another config)."""
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if unexpected:
            raise UserError(f"checkpoint does not match the model ({unexpected[0]} unexpected); "
                            "resume with the same config")

    def save_artifact(self, model: nn.Module, loaded: Any, out: Path,
                      whole: dict[str, torch.Tensor] | None = None) -> dict:
        """Store what the run produced under `out`; returns the record's artifacts entries
        ("adapter", "model", "head": path or None). `whole` is the gathered state dict under
        FSDP, whose parameters are shards. Default: nothing is saved."""
        return {"adapter": None, "model": None, "head": None}

    # --- costs ----------------------------------------------------------------------------

    def flops_formula(self, n_matmul: int, *, lora_params: int = 0, head_params: int = 0,
                      lora_fraction: float = 1.0) -> tuple[str, float]:
        """(the record's `flops_per_token_formula`, FLOPs per token) by what this strategy
        trains (`measure.flops_formula`); `lora_fraction` is for strategies with phases."""
        text, value = measure.flops_formula(
            n_matmul, trains=self.spec.trains, trains_all=self.trains_all,
            body_backward=self.body_backward, lora_params=lora_params, head_params=head_params)
        return measure.flops_per_token_formula(text, value), value

    def flops_per_token(self, n_matmul: int, **facts: Any) -> float:
        """Training FLOPs per token (`flops_formula`'s value)."""
        return self.flops_formula(n_matmul, **facts)[1]

    def flop_costs(self, model: nn.Module, *, tokens: int, train_seconds: float,
                   tokens_per_second: float, lora_fraction: float, rows: int,
                   device: torch.device, measure_peak: bool) -> tuple[dict, dict, list[str]]:
        """The record's training FLOPs, matmul peak and MFU: (costs, estimates, notes) entries.

        FLOPs per token follow `flops_formula` (phases mixed by `lora_fraction`, the LoRA
        share of the steps); the estimates spell the formula out. MFU (`peak.run_mfu`) divides
        by the matmul peak at the model's own largest linear shapes with `rows` (micro-batch x
        seq_len) rows, the run's dtype and thread count, re-measured if the run beats it.
        `measure_peak` False (not rank 0, or nothing trained) skips the peak: other ranks
        timing at once would slow each other down."""
        n_matmul = measure.matmul_parameters(model)
        kw = {"lora_params": sum(p.numel() for p in lora_parameters(model)),
              "head_params": sum(p.numel() for p in head_parameters(model))
              if self.spec.trains_head else 0}
        formula, fpt = self.flops_formula(n_matmul, lora_fraction=lora_fraction, **kw)
        train_flops = fpt * tokens
        costs: dict = {"train_flops": train_flops, "mfu": 0.0}
        estimates: dict = {"flops_per_token": fpt, "flops_per_token_formula": formula,
                           "matmul_params": n_matmul, "peak_flops_per_second": 0.0,
                           "peak": None}
        if not self.spec.trains or not measure_peak or train_seconds <= 0:
            return costs, estimates, []
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float32
        shapes = peaks.matmul_shapes(model, rows, str(device))
        mfu_costs, peak_estimates, notes = peaks.run_mfu(
            shapes, dtype, str(device), train_flops, train_seconds, fpt * tokens_per_second)
        return costs | mfu_costs, estimates | peak_estimates, notes

    # --- after training, and a saved run -------------------------------------------------------

    def finish(self, model: nn.Module, metrics: dict[str, dict], evaluate_fn: Evaluate,
               batches: list[dict], out: str | os.PathLike
               ) -> tuple[dict[str, dict], dict[str, Any] | None]:
        """After training: (metrics for the record, the record's "quant" section or None).
        Default: the metrics as evaluated, no deployment."""
        return metrics, None

    def rebuild_recorded(self, model: nn.Module, adapter: str | os.PathLike,
                         scheme_name: str | None) -> nn.Module:
        """The model whose metrics an adapter-saving run recorded, rebuilt from its freshly
        loaded float base `model` and its adapter directory, in place: W + s B A (the float
        base, adapter unmerged). `scheme_name` is the run's quantization scheme (unused here)."""
        return load_adapter(model, adapter)

    def float_export(self, model: nn.Module, scheme_name: str | None
                     ) -> tuple[nn.Module, str | None]:
        """(plain float model to save with `save_pretrained`, note for the user or None) of a
        run's rebuilt model: adapters folded in, W' = W + s B A."""
        return (merge_lora(model) if has_lora(model) else model), None


def install_speedups(model: nn.Module, device_type: str) -> None:
    """The CPU speed-ups `devices.device_defaults(device_type)` allows, in place.

    Frozen MLPs store less for backward (SwiGLU 2 of 3 activations, GPT-2 1 of 4); a projection
    that trains or carries an adapter takes the plain path, where GPT-2's MLP still runs the
    fused GELU in training (loralab.kernels.lean_mlp). The model's own dropout (GPT-2, BERT:
    p = 0.1) gets the cheap seeded masks, and attention dropout avoids SDPA's math path
    (loralab.lora.dropout, loralab.kernels.attention)."""
    speedups = device_defaults(device_type)
    if speedups.lean_mlps:
        lean_mlps(model)
    if speedups.seeded_dropout:
        seeded_dropouts(model)
    if speedups.seeded_dropout_attention:
        use_dropout_attention(model)


@contextmanager
def frozen_body(model: nn.Module, heads: Sequence[nn.Module]) -> Iterator[None]:
    """Run everything before the head under no_grad and the head (and what follows) with grad.

    The root's pre-hook disables grad, a pre-hook on every head module re-enables it (the first
    head module to run, e.g. DistilBERT's pre_classifier, is where grad starts), the root's
    post-hook restores the caller's mode. The body's activations are therefore never stored.
    Works under DDP too, whose own pre/post-forward logic sees grad enabled.
    """
    state = {}

    def root_pre(module: nn.Module, args: Any) -> None:
        state["prev"] = torch.is_grad_enabled()
        torch.set_grad_enabled(False)

    def head_pre(module: nn.Module, args: Any) -> None:
        torch.set_grad_enabled(state.get("prev", True))

    def root_post(module: nn.Module, args: Any, output: Any) -> None:
        torch.set_grad_enabled(state.get("prev", True))

    handles = [model.register_forward_pre_hook(root_pre), model.register_forward_hook(root_post)]
    handles += [head.register_forward_pre_hook(head_pre) for head in heads]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def strategy_for(config: TrainConfig) -> Strategy:
    """The strategy object of `config.method` (a UserError names the valid methods)."""
    spec = get_spec(config.method)
    return spec.load()(spec, config)


def strategy_named(name: str) -> Strategy:
    """The strategy of method `name` with default settings otherwise: for a saved run, whose
    scheme and artefacts are passed to `rebuild_recorded` / `float_export` explicitly."""
    return strategy_for(TrainConfig(method=name))
