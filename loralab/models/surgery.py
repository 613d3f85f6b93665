"""Pure model surgery shared by the layers that rewrite a model: swap a submodule, untie a weight.

Nothing here knows about LoRA or quantization; `loralab.lora` and `loralab.quant` call these to
insert or remove their layers.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (`model.layers.0.self_attn.q_proj`) by
    `module`, in place. Raises `AttributeError` when the parent path does not exist."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def untie_weight(model: nn.Module, module: nn.Module) -> bool:
    """Give `module` its own copy of its weight if the weight is shared with another module
    (a tied lm_head and input embedding). Needed before training or merging into the head,
    which would otherwise change the embeddings too. Returns True if a copy was made.

    The config's `tie_word_embeddings` (and its text config's) is cleared, so
    `save_pretrained` and a reload keep the two apart."""
    weight = cast(torch.Tensor, module.weight)
    # owners of the tensor only: a wrapper exposing its base layer's weight as a property (a LoRA
    # layer) is not an owner and must not count as sharing (it would untie every adapted layer)
    shared = any(m is not module and m._parameters.get("weight") is weight
                 for m in model.modules())
    if not shared:
        return False
    module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text = config.get_text_config() if hasattr(config, "get_text_config") else None
        if text is not None:
            text.tie_word_embeddings = False
    return True
