"""Folding adapters into a (partly) quantized model.

The model trained (or served unmerged) computes Q(W) x + s B A x, a merged quantized model
Q(W + s B A) x (or, from a quantized base, Q(deq(Q(W)) + s B A) x): these differ by the
re-quantization of the sum, the merge drift `loralab.quant.deploy` measures. A float export
instead keeps exactly the function trained, deq(Q(W)) + s B A, at fp32 size.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.lora.inject import lora_modules, merge_lora
from loralab.models.surgery import set_submodule, untie_weight
from loralab.quant.layers import restore_conv1d
from loralab.quant.schemes import Scheme, as_scheme
from loralab.quant.tensors import dequantize, is_quantized_tensor, quantize_tensor


@torch.no_grad()
def merge_into_quantized(model: nn.Module, scheme: Scheme | str) -> nn.Module:
    """Fold each adapter into its quantized base: W_q <- Q(deq(W_q) + s B A), then remove the
    adapters (in place). The float W is gone once a base is quantized, so the merge starts from
    deq(W_q); the re-quantization of the sum is the source of merge drift."""
    scheme = as_scheme(scheme)
    for name, layer in lora_modules(model):
        base: nn.Module = layer.base
        weight = base.weight
        assert isinstance(weight, torch.Tensor)
        if layer.conv1d or not is_quantized_tensor(weight):
            untie_weight(model, base)  # a tied lm_head must not change the embeddings
            layer.merge()
        else:
            merged = dequantize(weight).float() + layer.delta_weight().float()
            base.weight = nn.Parameter(quantize_tensor(merged.to(layer.lora_A.dtype), scheme),
                                       requires_grad=False)
        set_submodule(model, name, base)
    return model


@torch.no_grad()
def dequantized_merge(model: nn.Module) -> nn.Module:
    """A plain float model computing what a (partly) quantized adapter model computes: every
    quantized weight W_q becomes deq(W_q), then every adapter is folded in, W' = deq(W_q) + s B A
    (in place; returns the model). Exact up to fp32 rounding of the sum, except for schemes that
    also quantize activations (int8-dyn, int4): that quantization lives in the forward of the
    quantized tensor, not in its values, and the float model computes activations in float."""
    for module in model.modules():  # own parameters only (a LoRA layer shows its base's)
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        if weight is not None and is_quantized_tensor(weight):
            module.weight = nn.Parameter(dequantize(weight).detach().clone(),
                                         requires_grad=False)
    return merge_lora(model)


def dequantized_float(model: nn.Module) -> nn.Module:
    """A plain float transformers model of a (partly) quantized adapter model, in place:
    `dequantized_merge` (W' = deq(W_q) + s B A), then GPT-2's Conv1D layers restored so
    `save_pretrained` writes weights `from_pretrained` reads the right way round."""
    model = dequantized_merge(model)
    restore_conv1d(model)
    return model
