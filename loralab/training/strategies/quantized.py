"""What the three quantized LoRA strategies (qat-lora, qlora, lora-ptq) share: a quantized or
quantizable body under float adapters, deployment after training, and rebuilding the recorded
model of a saved run.

The body's linear layers are prepared for torchao first (GPT-2's Conv1D layers become the
equivalent nn.Linear), then each strategy quantizes its body its own way (`quantize_body`).
After training, `finish` deploys: the merged quantized model `deployed` (Q(W + s B A), or
Q(deq(Q(W)) + s B A) from a quantized base) against the unmerged one (Q(W) + s B A), with the
merge drift between them (loralab.quant.deploy), saved to `quantized/model.pt`.
Quantization is deterministic, so `rebuild_recorded` repeats training's and deployment's
operations on the same tensors and re-evaluation reproduces the recorded metrics.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from torch import nn

from loralab.errors import UserError
from loralab.lora.adapter import load_adapter
from loralab.quant import Scheme, conv1d_to_linear, get_scheme
from loralab.quant.deploy import Deployment, Transform, deploy, save_deployment
from loralab.quant.merge import dequantized_float
from loralab.training.strategies.base import Evaluate
from loralab.training.strategies.lora import LoRA


class QuantizedLoRA(LoRA):
    """LoRA on a quantized (or later quantized) body, deployed quantized after training."""

    records_deployed: ClassVar[bool] = True
    """The record's metrics are those of the deployed (merged, quantized) model; False: of
    the model as trained (a quantized base under float adapters, how QLoRA is served)."""
    float_reference: ClassVar[bool] = False
    """Deployment also sizes and times the float merged model W + s B A."""
    merged_export: ClassVar[str] = ""
    """What `loralab merge --run` writes for this method (shown to the user)."""

    @property
    def scheme(self) -> Scheme:
        """The run's quantization scheme (config `quant`)."""
        return get_scheme(self.config.quant)

    # --- what each quantized strategy decides -------------------------------------------------

    def quantize_body(self, model: nn.Module, scheme: Scheme) -> list[str]:
        """Quantize (or fake-quantize) the body before the adapters go in; returns notes."""
        raise NotImplementedError

    def deployed(self, model: nn.Module, scheme: Scheme) -> nn.Module:
        """The deployed model built from the trained adapter model, in place."""
        raise NotImplementedError

    def serve_unmerged(self, scheme: Scheme) -> Transform | None:
        """How the unmerged quantized model Q(W) + adapter is built from a copy of the trained
        model; None: the trained model already is it (measured, then merged in place)."""
        return None

    # --- the shared operations ----------------------------------------------------------------

    def prepare_with(self, model: nn.Module, scheme: Scheme) -> list[str]:
        """GPT-2's Conv1D layers as nn.Linear (for torchao), then `quantize_body`."""
        converted = conv1d_to_linear(model)
        notes = [f"{converted} Conv1D layers turned into equivalent nn.Linear layers (for "
                 "torchao)"] if converted else []
        return notes + self.quantize_body(model, scheme)

    def prepare_base(self, model: nn.Module) -> list[str]:
        return self.prepare_with(model, self.scheme)

    def deploy(self, model: nn.Module, evaluate_fn: Evaluate, batches: list[dict], *,
               adapter_metrics: dict[str, dict] | None = None, latency_repeats: int = 5
               ) -> Deployment:
        """The trained adapter model deployed with the run's scheme and measured against the
        unmerged one (`quant.deploy`: merge and logit drift, sizes, latency)."""
        scheme = self.scheme
        return deploy(model, scheme, evaluate_fn, batches,
                      merge=lambda m: self.deployed(m, scheme),
                      serve_unmerged=self.serve_unmerged(scheme),
                      float_reference=self.float_reference, adapter_metrics=adapter_metrics,
                      latency_repeats=latency_repeats)

    def finish(self, model: nn.Module, metrics: dict[str, dict], evaluate_fn: Evaluate,
               batches: list[dict], out: str | os.PathLike
               ) -> tuple[dict[str, dict], dict[str, Any] | None]:
        """`deploy`, save the quantized model to `out/quantized/model.pt`, and return (metrics
        for the run record, its "quant" section). Loading the run rebuilds the model of the
        recorded metrics from the adapter: `rebuild_recorded`."""
        dep = self.deploy(model, evaluate_fn, batches, adapter_metrics=metrics)
        info = save_deployment(dep, out)
        return (dep.metrics if self.records_deployed else metrics), info

    def rebuild_recorded(self, model: nn.Module, adapter: str | os.PathLike,
                         scheme_name: str | None) -> nn.Module:
        """The recorded model from the float base `model` and the adapter, in place: the body
        prepared with the run's scheme exactly as in training, the adapter loaded, then (when
        the record holds the deployed model's metrics) merged and quantized as `finish` did.
        Raises UserError when the run records no scheme."""
        if not scheme_name:
            raise UserError(f"this {self.name} run records no quantization scheme (config "
                            "'quant'), so its quantized model cannot be rebuilt; re-run it")
        scheme = get_scheme(scheme_name)
        self.prepare_with(model, scheme)
        load_adapter(model, adapter)
        return self.deployed(model, scheme) if self.records_deployed else model

    def float_export(self, model: nn.Module, scheme_name: str | None
                     ) -> tuple[nn.Module, str | None]:
        """(plain float transformers model, note for the user) of a rebuilt run: quantized
        weights dequantized, adapters folded in, GPT-2's Conv1D layers restored. Merging into
        the quantized base (re-quantizing W + s B A) would change the model (merge drift); the
        float export keeps exactly the recorded weights, at fp32 size."""
        scheme = get_scheme(str(scheme_name))
        model = dequantized_float(model)
        note = f"{self.name} run: merged model = {self.merged_export}"
        if scheme.activations:
            note += (f"; scheme {scheme.name} also quantized activations (int8 per token) in "
                     "the recorded model, the exported float model does not")
        return model, note
