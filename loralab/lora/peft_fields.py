"""Which fields of PEFT's `LoraConfig` loralab understands: an allow-list, so an adapter loralab
cannot reproduce is refused with one line instead of loading as a plain LoRA.

loralab computes every adapted layer as  y = W x + s B A x  with s = alpha / r (or alpha / sqrt(r)
with rsLoRA), or DoRA's rescaling of it (`use_dora`, `loralab.lora.dora`), places adapters where
the saved tensors name them and loads saved heads. Any PEFT option outside that formula (aLoRA's
token-dependent activation, a bias on B, ...) would be silently dropped by a loader that only
reads A and B: an aLoRA adapter then changes positions PEFT leaves untouched, by up to 0.76 in
the logits (issue 19).

Every field of `dataclasses.fields(peft.LoraConfig)` (peft 0.21.2) is classified in `FIELDS`:

- "implemented": loralab computes what the field asks for (for some fields only some values);
- "metadata": the field does not change what the loaded adapter computes or how it trains;
- "unsupported": a PEFT variant loralab does not implement; only its "off" value (None, False,
  empty) is accepted.

A field missing from the table (written by a newer PEFT) is accepted only with an "off" value:
PEFT writes every field of its config, new options default to None/False/empty, and a feature
switched on has a non-empty value, whose effect loralab cannot know, so it is an error. The tests
enumerate the installed PEFT's fields, so a PEFT upgrade that adds one fails until it is
classified here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from loralab.errors import UserError

Kind = Literal["implemented", "metadata", "unsupported"]
WITH_PEFT = "load it with PEFT"


def is_off(value: object) -> bool:
    """PEFT's convention for a disabled option: None, False or an empty list/dict/string.
    Numbers are never "off" (0 may be a meaningful setting)."""
    return value is None or value is False or (isinstance(value, (list, dict, str))
                                               and not value)


def _any(value: object) -> bool:
    return True


# init_lora_weights values that only initialise A and B (overwritten by the loaded weights) and
# leave the base weights alone. PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA subtract the initial
# adapter from (or quantise) the base weights, so their saved A, B are relative to a base model
# loralab does not have; MiCA freezes B during training (loralab would train it).
_PLAIN_INITS = ("gaussian", "orthogonal", "eva")


def _plain_init(value: object) -> bool:
    return value is True or value is False or (isinstance(value, str) and value in _PLAIN_INITS)


@dataclass(frozen=True)
class FieldRule:
    """How loralab treats one LoraConfig field: `accepts(value)` says whether loralab reproduces
    PEFT for that value; `reason` (one line) is what the field does; `fix` is the advice when a
    value is refused."""

    kind: Kind
    reason: str
    accepts: Callable[[object], bool] = _any
    fix: str = WITH_PEFT


def _implemented(reason: str, accepts: Callable[[object], bool] = _any,
                 fix: str = WITH_PEFT) -> FieldRule:
    return FieldRule("implemented", reason, accepts, fix)


def _metadata(reason: str) -> FieldRule:
    return FieldRule("metadata", reason)


def _unsupported(reason: str) -> FieldRule:
    return FieldRule("unsupported", reason, is_off)


_PLACEMENT = ("placement only; loralab puts adapters where the saved lora_A/lora_B tensors name "
              "them, which already reflects it")

FIELDS: Mapping[str, FieldRule] = MappingProxyType({
    # PeftConfig's own fields
    "peft_type": _implemented("the PEFT method", lambda v: v in (None, "LORA"),
                              "loralab loads LoRA adapters only"),
    "task_type": _metadata("which PeftModel wrapper; for LoRA its forward is the base model's "
                           "(a classifier arrives as modules_to_save tensors)"),
    "auto_mapping": _metadata("the base model's class, for PEFT's auto classes"),
    "peft_version": _metadata("the PEFT version that wrote the adapter"),
    "base_model_name_or_path": _metadata("where the base model came from (used in messages)"),
    "revision": _metadata("the base model's hub revision"),
    "inference_mode": _metadata("whether PEFT froze the adapter; loralab loads it trainable"),
    # LoRA's core: y = W x + (alpha / r) B A dropout(x)
    "r": _implemented("rank; loralab reads each layer's rank from its lora_A shape"),
    "target_modules": _implemented(_PLACEMENT),
    "exclude_modules": _implemented(_PLACEMENT),
    "layers_to_transform": _implemented(_PLACEMENT),
    "layers_pattern": _implemented(_PLACEMENT),
    "rank_pattern": _implemented("per-layer ranks; read from each lora_A shape"),
    "lora_alpha": _implemented("scale numerator alpha"),
    "alpha_pattern": _implemented("per-layer alpha, matched as PEFT matches it"),
    "use_rslora": _implemented("scale alpha / sqrt(r) instead of alpha / r"),
    "lora_dropout": _implemented("dropout on the adapter input (training only)"),
    "fan_in_fan_out": _implemented("weight layout; loralab takes it from the layer type "
                                   "(Conv1D or Linear), as PEFT corrects a wrong flag"),
    "bias": _implemented("which biases were trained; loralab trains none", lambda v: v == "none",
                         "re-train with bias='none' or load it with PEFT"),
    "modules_to_save": _implemented("fully trained heads, loaded from their saved tensors"),
    "init_lora_weights": _implemented(
        "PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA adapters are relative to base weights PEFT changed at "
        "initialisation, MiCA freezes lora_B", _plain_init,
        "convert it to a plain LoRA (PEFT's save_pretrained with "
        "path_initial_model_for_weight_conversion) or load it with PEFT"),
    # options that only configure an initialisation (judged through init_lora_weights) or the
    # way PEFT builds layers, not what a loaded adapter computes
    "eva_config": _metadata("EVA's data-driven init; its outcome is in the saved weights, "
                            "rank_pattern and alpha_pattern"),
    "loftq_config": _metadata("options of init_lora_weights='loftq' (refused there)"),
    "corda_config": _metadata("options of init_lora_weights='corda' (refused there)"),
    "lora_ga_config": _metadata("options of init_lora_weights='lora_ga' (refused there)"),
    "qalora_group_size": _metadata("QALoRA's pooling size, used only with use_qalora (refused)"),
    "megatron_config": _metadata("how PEFT builds Megatron tensor-parallel layers; same B A x"),
    "megatron_core": _metadata("the Megatron module PEFT imports for those layers"),
    "runtime_config": _metadata("runtime-only options (GPU offload); PEFT does not save it"),
    "use_dora": _implemented("DoRA: each output row of W + s B A rescaled to a learned "
                             "magnitude (lora_magnitude_vector; loralab.lora.dora)",
                             lambda v: isinstance(v, bool)),
    # LoRA variants and extensions loralab does not implement
    "alora_invocation_tokens": _unsupported("Activated LoRA: the adapter acts only from the "
                                            "invocation tokens on"),
    "use_qalora": _unsupported("QALoRA: A sees the input average-pooled in groups"),
    "velora_config": _unsupported("VeLoRA: the gradient of A from compressed activations"),
    "monteclora_config": _unsupported("MonteCLoRA: Monte Carlo perturbations of A"),
    "use_bdlora": _unsupported("BD-LoRA: block-diagonal A or B"),
    "arrow_config": _unsupported("Arrow: tokens routed among several LoRA experts"),
    "kasa_config": _unsupported("KaSA: truncated base singular values and a learned diagonal "
                                "between A and B"),
    "layer_replication": _unsupported("layer replication: a deeper stack of shared base layers"),
    "lora_bias": _unsupported("a trained bias on lora_B"),
    "target_parameters": _unsupported("LoRA on bare parameters (e.g. MoE experts)"),
    "trainable_token_indices": _unsupported("trainable tokens: selected embedding rows trained"),
    "ensure_weight_tying": _unsupported("ties the adapted or saved copies of tied layers "
                                        "(embedding and lm_head); loralab unties them"),
})


def _shown(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_lora_config(config: Mapping[str, object], where: str | os.PathLike) -> None:
    """Raise a one-line UserError for the first field of an adapter_config.json whose value
    loralab does not reproduce (see `FIELDS`); `where` names the file in the message."""
    for name, value in config.items():
        rule = FIELDS.get(name)
        if rule is None:
            if not is_off(value):
                raise UserError(f"{where}: adapter config field {name}={_shown(value)} is "
                                "unknown to loralab (a newer PEFT option?), so it may change "
                                f"the computation; {WITH_PEFT}")
        elif not rule.accepts(value):
            raise UserError(f"{where}: adapter uses {name}={_shown(value)} ({rule.reason}), "
                            f"which loralab does not implement; {rule.fix}")
