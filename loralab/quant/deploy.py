"""Deploying a trained adapter model quantized, and measuring what the merge costs.

A trained LoRA model computes (or is served as) an unmerged model, a quantized base plus the
float adapter, Q(W) x + s B A x. Deployment folds the adapter in and quantizes the sum,
Q(W + s B A) x (from a quantized base: Q(deq(Q(W)) + s B A) x). The two differ by the
re-quantization of the sum, so `deploy` evaluates both and records the logit and metric drift
between them, their sizes and their interleaved latency. Which transformations build the
merged and the unmerged model is the caller's (the fine-tuning strategy's) choice, passed in.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from loralab.lora.inject import merge_lora
from loralab.quant.drift import collect_logits, drift, latency, metric_drift
from loralab.quant.layers import body_linears
from loralab.quant.schemes import Scheme
from loralab.quant.sizes import count_parameters, disk_bytes, save_model, weight_bytes
from loralab.quant.tensors import is_quantized_tensor

Transform = Callable[[nn.Module], nn.Module]
"""An in-place model transformation returning the model (e.g. merge, then quantize)."""
Evaluate = Callable[[nn.Module], dict[str, dict]]
"""model -> {eval set: metrics}."""


@dataclass(frozen=True)
class Deployment:
    """A trained adapter model turned into a quantized one, with what it cost."""

    model: nn.Module
    """Merged and really quantized: Q(W + s B A) (from a quantized base, Q(deq(Q(W)) + s B A))."""
    metrics: dict[str, dict]
    """Eval metrics of `model`."""
    info: dict[str, Any]
    """Unmerged metrics, logit and metric drift, sizes, latency: JSON-serialisable."""


def _in_place(model: nn.Module, merge: Transform, evaluate_fn: Evaluate, batches: list[dict],
              adapter_metrics: dict[str, dict] | None, latency_repeats: int
              ) -> tuple[nn.Module, dict, list, dict]:
    """The unmerged model is `model` itself, measured first; then merged in place. torchao's
    NF4Tensor cannot be deep-copied (its clone re-quantizes with default block sizes)."""
    unmerged_metrics = adapter_metrics if adapter_metrics is not None else evaluate_fn(model)
    unmerged_logits = collect_logits(model, batches)
    times = latency({"unmerged": model}, batches[0], repeats=latency_repeats) \
        if batches and latency_repeats else {}
    merged = merge(model)
    if times:
        times |= latency({"merged": merged}, batches[0], repeats=latency_repeats)
    return merged, unmerged_metrics, unmerged_logits, times


def deploy(model: nn.Module, scheme: Scheme, evaluate_fn: Evaluate, batches: list[dict], *,
           merge: Transform, serve_unmerged: Transform | None, float_reference: bool = False,
           adapter_metrics: dict[str, dict] | None = None, latency_repeats: int = 5
           ) -> Deployment:
    """Merge a trained adapter model into a quantized one and measure the merge.

    `merge(model)` builds the deployed model Q(W + s B A) in place. `serve_unmerged(model)`
    builds the unmerged quantized model Q(W) + adapter in place; both run on deep copies, so
    `model` is left as it was. With `serve_unmerged` None, `model` already is the unmerged
    model (a quantized base under float adapters): it is measured as it stands and then merged
    in place. `float_reference`: also size and time the float merged model W + s B A (what
    post-training quantization starts from), in the same interleaved latency rounds.
    `evaluate_fn(model) -> {eval set: metrics}`; `batches` feed the logit drift and latency
    (none: no drift or latency). `adapter_metrics` are the metrics of `model` as it stands
    (saves one evaluation; recorded as "adapter_metrics" when `model` is copied).
    """
    float_bytes = 4 * count_parameters(model)[1]
    float_merged = None
    if serve_unmerged is None:
        merged, unmerged_metrics, unmerged_logits, times = _in_place(
            model, merge, evaluate_fn, batches, adapter_metrics, latency_repeats)
    else:
        merged = merge(copy.deepcopy(model))
        unmerged = copy.deepcopy(model)
        if float_reference:
            float_merged = merge_lora(copy.deepcopy(model)).eval()
        serve_unmerged(unmerged)
        unmerged_metrics = evaluate_fn(unmerged)
        unmerged_logits = collect_logits(unmerged, batches)
        timed = {"merged": merged, "unmerged": unmerged}
        if float_merged is not None:
            timed["float"] = float_merged
        times = latency(timed, batches[0], repeats=latency_repeats) \
            if batches and latency_repeats else {}
        del unmerged, timed
    merged_metrics = evaluate_fn(merged)
    info: dict[str, Any] = {
        "scheme": scheme.name, "scheme_note": scheme.note,
        "quantized_layers": sum(is_quantized_tensor(m.weight) for _, m in body_linears(merged)),
        "merged_model_bytes": disk_bytes(merged),
        "merged_weight_bytes": weight_bytes(merged),
        "float_weight_bytes": float_bytes,
        "unmerged_metrics": unmerged_metrics,
        "merge_logit_drift": (drift(unmerged_logits, collect_logits(merged, batches))
                              if batches else {}),
        "merge_metric_drift": metric_drift(unmerged_metrics, merged_metrics),
    }
    if adapter_metrics is not None and serve_unmerged is not None:
        info["adapter_metrics"] = adapter_metrics  # of the trained model (fake-quant or float)
    if float_merged is not None:
        info["float_model_bytes"] = disk_bytes(float_merged)  # the merged fp32 model
        del float_merged
    if times:
        info["latency"] = times
    return Deployment(merged, merged_metrics, info)


def save_deployment(deployment: Deployment, out: str | os.PathLike) -> dict[str, Any]:
    """Save the deployed model to `out/quantized/model.pt` (`save_model`: packed tensors) and
    return the run record's "quant" section: `deployment.info` plus the merged metrics, the
    file, its size in bytes and the model's logical parameter count."""
    path = save_model(deployment.model, Path(out) / "quantized" / "model.pt")
    info = dict(deployment.info)
    info["merged_metrics"] = deployment.metrics
    info["quantized_model"] = str(path)
    info["quantized_model_bytes"] = path.stat().st_size
    info["logical_params"] = count_parameters(deployment.model)[1]
    return info
