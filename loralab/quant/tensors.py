"""Quantized tensors: NF4, recognising and dequantizing torchao tensor subclasses, quantizing one
weight matrix, and the logical size and real bytes of a (quantized) tensor.

A quantized weight W_q is a tensor subclass (torchao's NF4Tensor, IntxUnpackedToInt8Tensor,
...) whose inner tensors hold packed data, scales and zero points; deq(W_q) is the float
matrix it stands for. Counting its parameters must use the logical shape, and sizing it must
sum its inner tensors.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch
from torch import nn

from loralab.quant.schemes import Scheme, quiet_import_torchao, torchao_config


def _nf4_module() -> ModuleType:
    quiet_import_torchao()
    return importlib.import_module("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")


def to_nf4(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """An NF4Tensor of `weight` (blocks run over the flattened weight): blocks of 64 values;
    the block absmaxes are double-quantized in blocks of 256 (QLoRA's defaults), or of the
    largest power of two dividing their count for small layers."""
    n_blocks = weight.numel() // block_size
    scaler_block = 256
    while n_blocks % scaler_block:
        scaler_block //= 2
    return _nf4_module().to_nf4(weight.detach(), block_size, scaler_block)


def is_quantized_tensor(t: torch.Tensor) -> bool:
    """A torchao (or other) tensor subclass holding quantized data, not a plain tensor."""
    return isinstance(t, torch.Tensor) and hasattr(t, "__tensor_flatten__") \
        and type(t) not in (torch.Tensor, nn.Parameter)


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """The float tensor a quantized weight stands for (plain tensors are returned as they are)."""
    if not is_quantized_tensor(t):
        return t
    if hasattr(t, "get_original_weight"):  # NF4Tensor
        return t.get_original_weight()
    return t.dequantize()


def quantize_tensor(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """One weight matrix quantized with `scheme` (through a throw-away nn.Linear)."""
    if scheme.weight == "nf4":
        return to_nf4(weight)
    quiet_import_torchao()
    from torchao.quantization import quantize_

    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype,
                      device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
    quantize_(layer, torchao_config(scheme), filter_fn=lambda m, fqn: m is layer)
    return layer.weight.detach()


def logical_numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for, not the storage elements holding them: torchao subclasses
    (NF4Tensor, IntxUnpackedToInt8Tensor, ...) report their logical shape; a bitsandbytes
    Params4bit packs two 4-bit values per byte and keeps the logical shape in `quant_state`."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    if shape is not None:
        return math.prod(shape)
    return math.prod(p.shape)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: the sum over the inner tensors of a tensor subclass (packed
    data, scales, zero points), numel x element size for a plain tensor."""
    if is_quantized_tensor(t):
        names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
