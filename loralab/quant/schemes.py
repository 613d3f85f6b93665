"""Quantization schemes: the formats the body's linear layers can be quantized to, and their
torchao configs.

Affine integer quantization of a weight W (one scale per output row, or per group of `g` input
columns), symmetric as torchao's `IntxWeightOnlyConfig` / `Int8DynamicActivationIntxWeightConfig`:

    s = max|W_group| / ((q_max - q_min) / 2),    Q(W) = clamp(round(W / s), q_min, q_max) * s

with (q_min, q_max) = (-128, 127) for int8 and (-8, 7) for int4. Dynamic int8 activations are
quantized per token, asymmetrically (scale and zero point from the token's min and max).
NF4 (QLoRA, Dettmers et al. 2023) stores 4-bit indices into 16 normal-quantile levels with one
absmax per block of 64 values, the absmaxes themselves int8-quantized ("double quantization").

What torchao 0.18 does on a CPU (x86, no CUDA):
- works: int8 weights (IntxWeightOnlyConfig int8 per channel, stored as int8 + fp32 scales),
  int8 dynamic activations x int8 or int4 weights (Int8DynamicActivationIntxWeightConfig), NF4
  (NF4Tensor, dequantized per matmul), and QATConfig prepare/convert for the intx configs, whose
  fake quantization equals the converted model's dequantized weights exactly;
- int4 on CPU is stored one value per byte (`intx_packing_format="unpacked_to_int8"`), so it
  is no smaller than int8; the packed CPU formats fail: "opaque_torchao_auto" (TorchAO kernel
  library is not loaded) and "opaque_aten_kleidiai" (needs KleidiAI, ARM);
- fails: Int4WeightOnlyConfig (the GPU int4 path): "plain"/"preshuffled" need the `mslk`
  package, "tile_packed_to_4d" asserts "Torch not compiled with CUDA enabled", "plain_int32"
  raises "does not support device 'cpu'". Scheme `int4-cuda` keeps that path for GPUs;
- every quantized CPU matmul dequantizes or runs a reference kernel, so quantized models are
  smaller but not faster than fp32 on a CPU (`loralab.quant.drift.latency` measures it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from loralab.errors import UserError


@dataclass(frozen=True)
class Scheme:
    """A quantization format for the body's linear layers."""

    name: str
    weight: str
    """Weight format: int8, int4 or nf4."""
    group_size: int | None
    """Input columns sharing a scale (None: one scale per output row)."""
    activations: bool
    """Also quantize each linear layer's input: int8, per token, dynamic."""
    cuda_only: bool
    note: str

    @property
    def weight_bits(self) -> int:
        return 8 if self.weight == "int8" else 4


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("int8", "int8", None, False, False,
           "int8 weights, one scale per output channel; fp32 activations"),
    Scheme("int8-dyn", "int8", None, True, False,
           "int8 per-token dynamic activations x int8 per-channel weights"),
    Scheme("int4", "int4", 32, True, False,
           "int8 dynamic activations x int4 weights in groups of 32 (stored one per byte on CPU)"),
    Scheme("int4-weight", "int4", 32, False, False,
           "int4 weights in groups of 32, fp32 activations (stored one per byte on CPU)"),
    Scheme("nf4", "nf4", 64, False, False,
           "4-bit NormalFloat, blocks of 64, double-quantized scales (QLoRA; qlora/PTQ only)"),
    Scheme("int4-cuda", "int4", 128, False, True,
           "torchao Int4WeightOnlyConfig (tinygemm/mslk int4 kernels, bf16): CUDA only"),
)}


def get_scheme(name: str, *, device: str | torch.device = "cpu") -> Scheme:
    """The scheme called `name`; a UserError for unknown names and for CUDA-only schemes off
    CUDA (saying exactly which torchao path fails and what works instead)."""
    scheme = SCHEMES.get(name)
    if scheme is None:
        raise UserError(f"unknown quantization scheme {name!r}; choose one of "
                        f"{', '.join(SCHEMES)}")
    if scheme.cuda_only and (torch.device(device).type != "cuda" or not torch.cuda.is_available()):
        raise UserError(f"quantization scheme {name!r} needs a CUDA GPU: torchao's "
                        "Int4WeightOnlyConfig has no CPU kernel here (packing 'plain' needs the "
                        "mslk package, 'tile_packed_to_4d' needs CUDA, 'plain_int32' rejects "
                        "device 'cpu'); on CPU use --quant int4 (int8 activations x int4 "
                        "weights) or int8")
    return scheme


def torchao_config(scheme: Scheme) -> Any:
    """The torchao post-training quantization config of a scheme (None for nf4, which is not a
    `quantize_` config but a tensor subclass applied with `to_nf4`)."""
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup

    if scheme.weight == "nf4":
        return None
    if scheme.cuda_only:
        return Int4WeightOnlyConfig(group_size=scheme.group_size)
    dtype = torch.int8 if scheme.weight == "int8" else torch.int4  # type: ignore[attr-defined]
    granularity = PerGroup(scheme.group_size) if scheme.group_size else PerAxis(0)
    if scheme.activations:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype,
                                                     weight_granularity=granularity)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


def quiet_import_torchao() -> None:
    """Import torchao once with its C++-extension notices (CUDA-only kernels) silenced."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), \
            contextlib.redirect_stdout(devnull):
        import torchao.quantization  # noqa: F401


def as_scheme(scheme: Scheme | str) -> Scheme:
    """`scheme` itself, or the scheme of that name (`get_scheme`, which raises UserError)."""
    return get_scheme(scheme) if isinstance(scheme, str) else scheme
