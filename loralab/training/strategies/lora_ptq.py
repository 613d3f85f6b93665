"""`lora-ptq`: LoRA in float, then merged and post-training quantized, Q(W + s B A).

The baseline quantization-aware training is measured against: the adapters never see the
quantization error. Deployment also sizes and times the float merged model W + s B A (what
post-training quantization starts from) in the same latency rounds."""

from __future__ import annotations

from torch import nn

from loralab.lora.inject import merge_lora
from loralab.quant import Scheme, quantize_weights
from loralab.quant.deploy import Transform
from loralab.training.strategies.quantized import QuantizedLoRA


class LoRAPTQ(QuantizedLoRA):
    """Float LoRA training; deployed as Q(W + s B A)."""

    float_reference = True
    merged_export = ("dequant(Q(W + s B A)) in float: the weights of the deployed quantized "
                     "model whose metrics the run recorded (quantized/model.pt keeps them packed)")

    def quantize_body(self, model: nn.Module, scheme: Scheme) -> list[str]:
        return [f"lora-ptq: LoRA in float, then merged and post-training quantized "
                f"({scheme.name})"]

    def deployed(self, model: nn.Module, scheme: Scheme) -> nn.Module:
        """Merge, then quantize the merged weights: Q(W + s B A)."""
        return quantize_weights(merge_lora(model), scheme)

    def serve_unmerged(self, scheme: Scheme) -> Transform | None:
        """The bases under the adapters quantized: Q(W) x + s B A x."""
        return lambda m: quantize_weights(m, scheme)
