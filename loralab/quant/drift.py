"""How far a quantized model is from its reference, and how fast it runs: logits, logit and
metric drift, interleaved forward latency.

Drift of logits b from reference logits a, per position: |a - b| (max, mean, mean relative to
mean |a|), KL(softmax(a) || softmax(b)), and top-1 agreement. Latency rounds time every model
once per round, so load from other processes hits all models alike.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return (out.logits if hasattr(out, "logits") else out[0]).float()


@torch.no_grad()
def collect_logits(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """fp32 logits of each batch, padding positions dropped: (positions, classes) per batch."""
    was = model.training
    model.eval()
    out = []
    for batch in batches:
        logits = _logits(model, batch)
        if logits.dim() == 3:  # (B, T, V): keep real tokens only
            mask = batch.get("attention_mask")
            keep = (mask.bool() if mask is not None
                    else torch.ones(logits.shape[:2], dtype=torch.bool))
            logits = logits[keep]
        out.append(logits)
    model.train(was)
    return out


def drift(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    """How far `other` logits are from `reference` ones: max and mean |difference|, the mean
    difference relative to the reference's mean |logit|, the mean KL(p_ref || p_other) per
    position, and how often the top-1 prediction agrees."""
    a, b = torch.cat(reference), torch.cat(other)
    d = (a - b).abs()
    kl = F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "rel_mean_abs": float(d.mean() / a.abs().mean().clamp(min=1e-12)),
            "mean_kl": float(kl.mean()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def logit_drift(model_a: nn.Module, model_b: nn.Module, batches: list[dict]) -> dict[str, float]:
    """`drift` of model b's logits from model a's on the same batches."""
    return drift(collect_logits(model_a, batches), collect_logits(model_b, batches))


def metric_drift(reference: dict[str, dict], other: dict[str, dict]) -> dict[str, dict]:
    """other - reference for every numeric metric of every eval set both hold."""
    out: dict[str, dict] = {}
    for split, metrics in reference.items():
        if split not in other:
            continue
        out[split] = {k: float(other[split][k]) - float(v) for k, v in metrics.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)
                      and isinstance(other[split].get(k), (int, float)) and k != "targets"}
    return out


@torch.inference_mode()
def latency(models: dict[str, nn.Module], batch: dict, *, repeats: int = 7,
            warmup: int = 1) -> dict[str, dict[str, float]]:
    """Forward-pass latency of each model on the same batch, interleaved (round r times every
    model once, so load from other processes hits all models alike); median and spread (min,
    max) in milliseconds over `repeats` rounds."""
    for m in models.values():
        m.eval()
        for _ in range(warmup):
            _logits(m, batch)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            _logits(m, batch)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
            for k, v in times.items()}
