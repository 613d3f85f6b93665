"""Quantized frozen bases (QLoRA, post-training quantization): the body's weights replaced by
really quantized tensors, and a backward that keeps only their packed form.

With W_q frozen, a layer y = x deq(W_q)^T + b needs only dx = g deq(W_q) in backward, so it
can save W_q (packed, 1/4 or 1/8 of fp32) instead of the dequantized float matrix.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from loralab.quant.layers import body_linears, layer_filter, require_linears
from loralab.quant.schemes import Scheme, as_scheme, quiet_import_torchao, torchao_config
from loralab.quant.tensors import dequantize, is_quantized_tensor, to_nf4


def quantize_weights(model: nn.Module, scheme: Scheme | str) -> nn.Module:
    """Replace the body's linear weights by quantized tensors, in place (post-training
    quantization; or a QLoRA base when done before `apply_lora`). Returns the model."""
    scheme = as_scheme(scheme)
    layers = require_linears(model, scheme)
    if scheme.weight == "nf4":
        for _, layer in layers:
            layer.weight = nn.Parameter(to_nf4(layer.weight), requires_grad=False)
        return model
    quiet_import_torchao()
    from torchao.quantization import quantize_

    quantize_(model, torchao_config(scheme), filter_fn=layer_filter(layers))
    return model


class _PackedLinear(torch.autograd.Function):
    """y = x deq(W_q)^T + b for a frozen quantized W_q, saving only W_q (packed) for backward:
    dx = g deq(W_q). torchao's int8 tensors run F.linear on the dequantized weight under
    autograd, which keeps a float copy of every weight until backward; NF4's own linear_nf4
    already works this way."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, dequantize(weight).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, g):
        (weight,) = ctx.saved_tensors
        d_x = g @ dequantize(weight).to(g.dtype) if ctx.needs_input_grad[0] else None
        d_b = g.reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return d_x, None, d_b


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _PackedLinear.apply(x, self.weight, self.bias)


def keep_packed_in_backward(model: nn.Module) -> int:
    """Make every frozen body linear with a quantized weight save only its packed weight for
    backward (an instance-level forward; names and state dict unchanged). Returns the count."""
    n = 0
    for _, layer in body_linears(model):
        if is_quantized_tensor(layer.weight) and not layer.weight.requires_grad:
            layer.forward = types.MethodType(_packed_forward, layer)  # type: ignore[method-assign]
            n += 1
    return n
