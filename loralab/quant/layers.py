"""Which layers quantization touches: the body's `nn.Linear` layers (never the task head),
and GPT-2's `Conv1D` layers turned into equivalent `nn.Linear` ones (and back) for torchao.

GPT-2 computes y = x W + b with W stored d_in x d_out (transformers `Conv1D`); torchao only
quantizes `nn.Linear` (y = x W^T + b), so `conv1d_to_linear` stores W^T in a Linear, which
computes the same function, and `restore_conv1d` undoes it before `save_pretrained`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loralab.errors import UserError
from loralab.lora.targets import head_module_names
from loralab.models.surgery import set_submodule
from loralab.quant.schemes import Scheme


def body_linears(model: nn.Module, scheme: Scheme | None = None) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` layers of the body: everything but the task head (lm_head / classifier,
    which stays float: it is trained, or tied to the embeddings) and, for grouped schemes,
    layers whose input width is not a multiple of the group size. Layers inside a LoRA wrapper
    are found under `<name>.base`. GPT-2's Conv1D layers are not `nn.Linear` (torchao skips
    them): `conv1d_to_linear` first."""
    heads = set(head_module_names(model))
    heads |= {f"{h}.base" for h in heads}
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in heads:
            continue
        if scheme is not None and scheme.weight == "nf4":
            block = scheme.group_size or 1
            if module.weight.numel() % block:  # NF4 blocks run over the flat weight
                continue
        elif scheme is not None and scheme.group_size and module.in_features % scheme.group_size:
            continue
        out.append((name, module))
    return out


@torch.no_grad()
def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers `Conv1D` (GPT-2: y = x W + b with W stored d_in x d_out) by the
    equivalent `nn.Linear` (weight W^T), in place, so torchao can quantize GPT-2's body. The
    function computed is unchanged. Returns how many layers were replaced."""
    n = 0
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D":
            continue
        d_in, d_out = module.weight.shape
        layer = nn.Linear(d_in, d_out, bias=module.bias is not None,
                          device=module.weight.device, dtype=module.weight.dtype)
        layer.weight.copy_(module.weight.T)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
        layer.requires_grad_(module.weight.requires_grad)
        set_submodule(model, name, layer)
        n += 1
    return n


def require_linears(model: nn.Module, scheme: Scheme) -> list[tuple[str, nn.Linear]]:
    layers = body_linears(model, scheme)
    if not layers:
        raise UserError(f"no nn.Linear layers to quantize with scheme {scheme.name!r} in "
                        f"{type(model).__name__} (GPT-2's Conv1D layers are not supported by "
                        "torchao); use a Linear-based model such as smollm2-135m or minilm-l6")
    return layers


def layer_filter(layers: Iterable[tuple[str, nn.Module]]) -> Callable[[nn.Module, str], bool]:
    ids = {id(m) for _, m in layers}
    return lambda module, fqn: id(module) in ids


@torch.no_grad()
def restore_conv1d(model: nn.Module) -> int:
    """Undo `conv1d_to_linear` (in place): every `nn.Linear` that is a transformers `Conv1D` in
    the model's architecture (found on a weightless meta-device copy built from its config)
    becomes that Conv1D again (weight W^T), so `save_pretrained` writes weights that
    `from_pretrained` reads with the right orientation. Returns how many layers were restored."""
    from_config = getattr(type(model), "_from_config", None)
    if from_config is None:  # not a transformers model: no Conv1D architecture to return to
        return 0
    with torch.device("meta"):
        skeleton = from_config(model.config)
    names = [n for n, m in skeleton.named_modules() if isinstance(m, Conv1D)]
    del skeleton
    n = 0
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            continue
        layer = Conv1D(module.out_features, module.in_features)
        layer.to(device=module.weight.device, dtype=module.weight.dtype)
        layer.weight.copy_(module.weight.T)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
        else:
            layer.bias = None
        set_submodule(model, name, layer)
        n += 1
    return n
