"""`qlora`: LoRA on a really quantized frozen base (int8 / int4 / nf4 weights; QLoRA,
Dettmers et al. 2023).

The body's weights are replaced by quantized tensors before the adapters go in, and each
frozen layer keeps only its packed weight for backward, so training holds 1/4 (int8) or ~1/8
(nf4) of the float weights. The run's metrics are those of what it trained, Q(W) + s B A (how
QLoRA adapters are served); the merged Q(deq(Q(W)) + s B A) and its merge drift go to the
record's "quant" section."""

from __future__ import annotations

from torch import nn

from loralab.errors import UserError
from loralab.quant import (
    Scheme,
    keep_packed_in_backward,
    merge_into_quantized,
    quantize_weights,
    weight_bytes,
)
from loralab.training.strategies.quantized import QuantizedLoRA


class QLoRA(QuantizedLoRA):
    """Adapters on a quantized frozen base; the record keeps the unmerged model's metrics."""

    records_deployed = False
    merged_export = ("dequant(Q(W)) + s B A in float: the function the run trained and "
                     "evaluated (quantized base + adapter), with the base's quantization error "
                     "baked in (not the original W + s B A); the re-quantized merge "
                     "Q(dequant(Q(W)) + s B A) and its merge drift are in quantized/model.pt "
                     "and record.json 'quant'")

    def quantize_body(self, model: nn.Module, scheme: Scheme) -> list[str]:
        """Quantize the stored weights (packed in backward). Raises UserError for schemes that
        also quantize activations."""
        if scheme.activations:
            raise UserError(f"qlora quantizes the stored base weights only; scheme "
                            f"{scheme.name!r} also quantizes activations: use int8, "
                            "int4-weight or nf4")
        before = weight_bytes(model)
        quantize_weights(model, scheme)
        keep_packed_in_backward(model)
        return [f"qlora: frozen base {scheme.name} ({scheme.note}); weights "
                f"{before / 1e6:.2f} MB -> {weight_bytes(model) / 1e6:.2f} MB"]

    def deployed(self, model: nn.Module, scheme: Scheme) -> nn.Module:
        """Fold the adapters into the quantized base: Q(deq(Q(W)) + s B A), in place."""
        return merge_into_quantized(model, scheme)
