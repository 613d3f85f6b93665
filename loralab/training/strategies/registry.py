"""The registry of fine-tuning strategies: their names, what each one does, and where its class is.

This is the one place that knows which methods exist. The `train` command's `--method`
choices, a study file's validation, the report's row order and the cost model all read it;
nothing else compares a method's name to a string literal.

The registry holds facts only and imports nothing heavy (no torch), so the command line can
offer the choices and their help without starting torch. A strategy's behaviour (model
surgery, what it trains, saves and counts) lives in its class, one file per method under
`loralab/training/strategies/`, loaded on first use by `StrategySpec.load`.

Adding a method: write its class in a new file (subclass `base.Strategy` or a relative, e.g.
`lora.LoRA`), then add one `StrategySpec(...)` line to `STRATEGIES` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loralab.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from loralab.training.strategies.base import Strategy


LORALAB, PEFT = "loralab", "PEFT"
"""The implementations a strategy may train (`StrategySpec.library`)."""


@dataclass(frozen=True)
class StrategySpec:
    """What the rest of loralab may know about a method without running it.

    name         the method's name in configs, study files, records and `--method`
    summary      one line for `--help` and the README
    implementation  "module:Class" of its behaviour (a `base.Strategy` subclass)
    trains       False only for `none` (evaluate the pretrained model; no training costs)
    uses_lora    trains LoRA adapters (takes rank, alpha, dropout, target modules)
    quantized    quantizes the base (`quant` scheme) and records a "quant" section
    trains_head  the task head is trained on its own for all (head) or part (lora-head) of it
    shardable    may run under FSDP (parameters, gradients and optimizer state sharded)
    library      whose implementation trains: LORALAB (this package's layers) or PEFT (Hugging
                 Face PEFT's own, configured by the run's `peft` mapping); the report marks it
    """

    name: str
    summary: str
    implementation: str
    trains: bool = True
    uses_lora: bool = False
    quantized: bool = False
    trains_head: bool = False
    shardable: bool = False
    library: str = LORALAB

    def load(self) -> type[Strategy]:
        """The strategy's class, imported on first use (it imports torch)."""
        module, _, cls = self.implementation.partition(":")
        return getattr(importlib.import_module(module), cls)


_PKG = "loralab.training.strategies"

STRATEGIES: tuple[StrategySpec, ...] = (
    StrategySpec("none", "evaluate the pretrained model, no training",
                 f"{_PKG}.none:NoTuning", trains=False),
    StrategySpec("full", "every parameter trains (FSDP when distributed)",
                 f"{_PKG}.full:FullFineTuning", shardable=True),
    StrategySpec("head", "only the task head trains; the frozen body runs under no_grad",
                 f"{_PKG}.head:HeadOnly", trains_head=True),
    StrategySpec("lora", "LoRA adapters (+ the task head for classify)",
                 f"{_PKG}.lora:LoRA", uses_lora=True),
    StrategySpec("lora-head", "LoRA, then adapters frozen and the head alone for head_epochs",
                 f"{_PKG}.lora_head:LoRAThenHead", uses_lora=True, trains_head=True),
    StrategySpec("qat-lora", "LoRA on a fake-quantized body (QAT), then merged and quantized",
                 f"{_PKG}.qat_lora:QATLoRA", uses_lora=True, quantized=True),
    StrategySpec("qlora", "LoRA on a quantized frozen base (int8 / int4 / nf4 weights)",
                 f"{_PKG}.qlora:QLoRA", uses_lora=True, quantized=True),
    StrategySpec("lora-ptq", "LoRA in float, then merged and post-training quantized",
                 f"{_PKG}.lora_ptq:LoRAPTQ", uses_lora=True, quantized=True),
    StrategySpec("peft", "PEFT's own adapters (LoRA, or IA3, VeRA, ... by the peft mapping)",
                 f"{_PKG}.peft:PEFTAdapters", uses_lora=True, library=PEFT),
)
"""Every method, in the order the CLI lists them and the report shows them."""

_BY_NAME = {spec.name: spec for spec in STRATEGIES}


def names() -> tuple[str, ...]:
    """Every method's name, in registry order."""
    return tuple(_BY_NAME)


def get_spec(name: str) -> StrategySpec:
    """The spec of method `name`. Raises UserError naming the valid methods if unknown."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(_BY_NAME)}") \
            from None


def order(name: str) -> int:
    """Position of a method in the registry (for sorting report rows); unknown ones last."""
    return list(_BY_NAME).index(name) if name in _BY_NAME else len(_BY_NAME)
