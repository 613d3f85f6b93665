"""`qat-lora`: LoRA on a fake-quantized body (quantization-aware training), then merged and
really quantized.

While the adapters train, every body linear computes with fake-quantized weights Q(W) (and
inputs Q(x) for schemes with activation quantization), so the adapters learn to compensate
the quantization error; the deployed model is convert(merge) = Q(W + s B A) (loralab.quant.qat).
"""

from __future__ import annotations

from torch import nn

from loralab.errors import UserError
from loralab.lora.inject import merge_lora
from loralab.quant import Scheme, convert_qat, prepare_qat
from loralab.quant.deploy import Transform
from loralab.training.strategies.quantized import QuantizedLoRA


class QATLoRA(QuantizedLoRA):
    """Fake-quantized body under adapters; deployed as Q(W + s B A)."""

    merged_export = ("dequant(Q(W + s B A)) in float: the weights of the deployed quantized "
                     "model whose metrics the run recorded (quantized/model.pt keeps them packed)")

    def quantize_body(self, model: nn.Module, scheme: Scheme) -> list[str]:
        """QAT prepare. Raises UserError for nf4, which has no fake-quantized form."""
        if scheme.weight == "nf4":
            raise UserError("scheme 'nf4' has no fake-quantized (QAT) form in torchao; use it "
                            "with method qlora or lora-ptq, or pick int8, int8-dyn, int4 or "
                            "int4-weight for qat-lora")
        n = prepare_qat(model, scheme)
        return [f"qat-lora: {n} linear layers fake-quantized ({scheme.name}: {scheme.note})"]

    def deployed(self, model: nn.Module, scheme: Scheme) -> nn.Module:
        """Merge, then convert the fake-quantized bases: Q(W + s B A)."""
        return convert_qat(merge_lora(model), scheme)

    def serve_unmerged(self, scheme: Scheme) -> Transform | None:
        """Bases converted, adapters kept: Q(W) x + s B A x."""
        return lambda m: convert_qat(m, scheme)
