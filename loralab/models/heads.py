"""What a task head is: the modules a transformers task class adds on top of its backbone.

`task_head_modules(model)` finds them by structure (siblings of `model.base_model`), never by a
list of names; the rest reads, saves, loads and unties them. Nothing here knows about LoRA: a
module that carries adapters says so through the `CarriesAdapters` protocol, so
`head_parameters` can leave its adapter factors out by object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, cast, runtime_checkable

import torch
from safetensors.torch import load_file
from torch import nn

from loralab.errors import UserError
from loralab.models.surgery import untie_weight


@runtime_checkable
class CarriesAdapters(Protocol):
    """A module holding adapter parameters on top of a frozen base layer (`LoRALinear`).

    `adapter_parameters()` returns those parameters (LoRA's A and B); they belong to the
    adapters, not to the head the module sits in."""

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]: ...


class _HasEmbeddings(Protocol):
    """A transformers `PreTrainedModel`'s embedding accessors."""

    def get_input_embeddings(self) -> nn.Module: ...

    def get_output_embeddings(self) -> nn.Module | None: ...


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    """`model.get_output_embeddings()`, or None for a model without that accessor."""
    if not hasattr(model, "get_output_embeddings"):
        return None
    return cast(_HasEmbeddings, model).get_output_embeddings()


def task_head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The task head: the modules the task class adds on top of its backbone, by their names in
    `model`, in the model's order.

    Every transformers task class (`XForSequenceClassification`, `XForCausalLM`, ...) holds its
    backbone under `model.base_model_prefix` (`model.base_model`) and adds the task's layers as
    sibling children: DistilBERT `pre_classifier` + `classifier`, BERT `classifier`, RoBERTa and
    ELECTRA `classifier` (a wrapper: `dense` + `out_proj`), DeBERTa `pooler` + `classifier`,
    GPT-2 / LLaMA / Qwen / Gemma `score`, causal LMs `lm_head`. For a classifier these are the
    weights a base checkpoint does not have; for an LM, its output layer. So the head is found by
    that structure, never by a list of names. Children without parameters (dropout, activations)
    are left out: there is nothing in them to train or save. A model with no separate backbone
    (`base_model` is the model itself) falls back to its output embeddings.
    """
    backbone = getattr(model, "base_model", None)
    heads: dict[str, nn.Module] = {}
    if isinstance(backbone, nn.Module) and backbone is not model:
        for name, child in model.named_children():
            if child is not backbone and next(child.parameters(), None) is not None:
                heads[name] = child
    if not heads:
        out = _output_embeddings(model)
        out_name = next((n for n, m in model.named_modules() if n and m is out), None)
        if out is not None and out_name is not None:
            heads[out_name] = out
    if not heads:
        raise UserError(f"{type(model).__name__} has no task head (no module besides its "
                        "backbone, and no output embeddings); use a task model class")
    return heads


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The head's own parameters, each once (RoBERTa's LM head shares one bias between two of
    its modules). LoRA factors of an adapted layer inside the head are the adapters', not the
    head's: they train and are saved with the adapters. They are recognised by object: every
    module that implements `CarriesAdapters` (loralab.lora's `LoRALinear`) names its own."""
    skip = {id(p) for m in model.modules() if isinstance(m, CarriesAdapters)
            for p in m.adapter_parameters()}
    out: list[nn.Parameter] = []
    for head in task_head_modules(model).values():
        for p in head.parameters():
            if id(p) not in skip:
                skip.add(id(p))
                out.append(p)
    return out


def describe_head(model: nn.Module, names: list[str] | None = None) -> str:
    """`pre_classifier (Linear, 4,160 parameters) + classifier (Linear, 130 parameters)`: the
    head modules (all, or `names`) with their class and parameter count, for notes."""
    heads = task_head_modules(model)
    own = {id(p) for p in head_parameters(model)}
    parts = []
    for name in names if names is not None else list(heads):
        n = sum(p.numel() for p in heads[name].parameters() if id(p) in own)
        parts.append(f"{name} ({type(heads[name]).__name__}, {n:,} parameters)")
    return " + ".join(parts)


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's tensors keyed by their names in `model` (`pre_classifier.weight`, ...; the
    keys of `model.state_dict()`), detached, for `head.safetensors`. A tensor that shares its
    storage with an earlier one (a tied bias) is cloned, since safetensors refuses aliases."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, head in task_head_modules(model).items():
        for key, tensor in head.state_dict().items():
            ptr = tensor.untyped_storage().data_ptr()
            tensor = tensor.detach()
            out[f"{name}.{key}"] = (tensor.clone() if ptr in seen else tensor).contiguous()
            seen.add(ptr)
    return out


def load_head_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a saved head (`head_state` keys) into `model`'s head, strictly: exactly the same
    tensor names, shapes and dtypes, else a one-line `UserError`. A head weight tied to the input
    embeddings is untied first, so loading the trained head leaves the embeddings untouched.

    Heads saved before heads could span several modules hold one module's keys without its
    name (`weight`, `bias`); they are accepted when the head is that one module."""
    untie_head(model)
    heads = task_head_modules(model)
    live = {f"{name}.{k}": v for name, head in heads.items() for k, v in head.state_dict().items()}
    if len(heads) == 1 and set(tensors) and not set(tensors) & set(live):
        (only,) = heads
        tensors = {f"{only}.{k}": v for k, v in tensors.items()}
    missing, unexpected = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, not in the head"
        raise UserError(f"{source} does not match this model's head ({' + '.join(heads)}): it "
                        f"{what}; re-run the training with this loralab version and base model")
    for key, tensor in tensors.items():
        if tensor.shape != live[key].shape or tensor.dtype != live[key].dtype:
            raise UserError(f"{source}: {key} is {tuple(tensor.shape)} {tensor.dtype} but the "
                            f"model's is {tuple(live[key].shape)} {live[key].dtype}; use the "
                            "run's base model and num_labels")
    with torch.no_grad():
        for key, tensor in tensors.items():
            live[key].copy_(tensor)


def load_head_file(model: nn.Module, path: str | Path) -> None:
    """Load a head-only run's `head.safetensors` into `model` (`load_head_state`, strict);
    a missing or unreadable file is a one-line `UserError`. Safetensors only, never pickle."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; the head-only run saved no head, re-run it")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise UserError(f"{path} is corrupt or not a safetensors file ({exc}); re-run the "
                        "training") from None
    load_head_state(model, tensors, str(path))


def is_head_tied(model: nn.Module) -> bool:
    """True when the lm_head shares its weight tensor with the input embeddings."""
    if not hasattr(model, "get_output_embeddings"):
        return False
    out, inp = _output_embeddings(model), cast(_HasEmbeddings, model).get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def untie_head(model: nn.Module) -> bool:
    """Give the lm_head its own copy of the embedding matrix; returns True if it was tied.

    Why: with tied weights, training the head also trains the input embeddings (one tensor),
    so "head-only" or "LoRA + head" would silently update the embedding layer too. The config
    flag is cleared so `save_pretrained`/reloads keep the two apart (`untie_weight`).
    """
    if not is_head_tied(model):
        return False
    out = _output_embeddings(model)
    assert out is not None  # is_head_tied found it
    return untie_weight(model, out)
