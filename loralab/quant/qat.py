"""Quantization-aware training (QAT): fake quantization of the body's linear layers, its
conversion to real quantization, and naive reference quantizers for tests and docs.

While the adapters train (torchtune's QAT + LoRA recipe), every body linear computes with
fake-quantized weights Q(W) (and, for schemes with activation quantization, fake-quantized
inputs Q(x)), so the adapters learn to compensate the quantization error; after training the
adapters are merged and the layers converted to real quantization. The straight-through
estimator (round has derivative 1 inside the clamp range) carries gradients through Q(x) to the
adapters of earlier layers. W itself is frozen, so no gradient ever flows into Q(W): the weight
fake-quantizer only changes the forward values.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.errors import UserError
from loralab.quant.layers import layer_filter, require_linears
from loralab.quant.schemes import Scheme, as_scheme, quiet_import_torchao, torchao_config


def prepare_qat(model: nn.Module, scheme: Scheme | str) -> int:
    """QAT prepare (torchao `QATConfig(base, step="prepare")`): every body linear becomes a
    `FakeQuantizedLinear` whose forward is F.linear(Q_a(x), Q_w(W), b). `LoRALinear` applies the
    same fake quantizers around its fused matmul. Call before `apply_lora`. Returns how many
    layers were fake-quantized. Raises UserError for nf4 (no fake-quantized form in torchao)
    and for a model without body `nn.Linear` layers."""
    scheme = as_scheme(scheme)
    if scheme.weight == "nf4":
        raise UserError("scheme 'nf4' has no fake-quantized (QAT) form in torchao; pick int8, "
                        "int8-dyn, int4 or int4-weight")
    layers = require_linears(model, scheme)
    quiet_import_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(torchao_config(scheme), step="prepare"),
              filter_fn=layer_filter(layers))
    return len(layers)


def convert_qat(model: nn.Module, scheme: Scheme | str) -> nn.Module:
    """QAT convert: every `FakeQuantizedLinear` (also one inside a LoRA wrapper) becomes an
    `nn.Linear` with really quantized weights, in place. Merge the adapters first to deploy
    Q(W + s B A); convert with the adapters in place to serve Q(W) x + s B A x."""
    scheme = as_scheme(scheme)
    quiet_import_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    quantize_(model, QATConfig(torchao_config(scheme), step="convert"),
              filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    return model


def reference_fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None
                            ) -> torch.Tensor:
    """Q(W) = clamp(round(W * (1/s)), q_min, q_max) * s with s = max|W_group| / ((q_max-q_min)/2),
    symmetric, per output row (group_size None) or per group of input columns."""
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows, cols = w.shape
    g = group_size or cols
    groups = w.reshape(rows, cols // g, g)  # in w's dtype: the rounding ties depend on it
    scale = groups.abs().amax(-1, keepdim=True) / ((q_max - q_min) / 2)
    scale = scale.clamp(min=torch.finfo(torch.float32).eps)
    # x * (1 / s), not x / s: torchao multiplies by the reciprocal, which moves exact ties at
    # +-max|W| (w / s = -127.5 -> -128 by round-half-even) onto the inner level (-127)
    q = torch.clamp(torch.round(groups * (1.0 / scale)), q_min, q_max)
    return (q * scale).reshape(rows, cols).to(w.dtype)


def reference_fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric int8 per token (last dim): s = (max - min) / 255, z = -128 - round(min / s),
    Q(x) = (clamp(round(x / s) + z, -128, 127) - z) * s, with min <= 0 <= max."""
    x2 = x.double()
    lo = x2.amin(-1, keepdim=True).clamp(max=0)
    hi = x2.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zero = -128 - torch.round(lo / scale)
    q = torch.clamp(torch.round(x2 / scale) + zero, -128, 127)
    return ((q - zero) * scale).to(x.dtype)
