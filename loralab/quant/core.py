"""Quantization for LoRA: QAT-LoRA, post-training quantization, quantized frozen bases (QLoRA),
merge-into-quantized drift, logical parameter counts, sizes on disk and CPU latency.

Affine integer quantization of a weight W (one scale per output row, or per group of `g` input
columns), symmetric as torchao's `IntxWeightOnlyConfig` / `Int8DynamicActivationIntxWeightConfig`:

    s = max|W_group| / ((q_max - q_min) / 2),    Q(W) = clamp(round(W / s), q_min, q_max) * s

with (q_min, q_max) = (-128, 127) for int8 and (-8, 7) for int4. Dynamic int8 activations are
quantized per token, asymmetrically (scale and zero point from the token's min and max).
NF4 (QLoRA, Dettmers et al. 2023) stores 4-bit indices into 16 normal-quantile levels with one
absmax per block of 64 values, the absmaxes themselves int8-quantized ("double quantization").

Three ways to deploy a LoRA-tuned model quantized, all measured by `compare_quantization`:

- float + LoRA: merge W' = W + s B A and keep fp32;
- PTQ: merge, then quantize W' (post-training quantization, no retraining);
- QAT-LoRA (torchtune's QAT + LoRA recipe): while the adapters train, every body linear layer
  computes with fake-quantized weights Q(W) (and, for schemes with activation quantization,
  fake-quantized inputs Q(x)), so the adapters learn to compensate the quantization error; then
  merge and convert to real quantization. The straight-through estimator (round has derivative
  1 inside the clamp range) carries gradients through Q(x) to the adapters of earlier layers. W
  itself is frozen, so no gradient ever flows into Q(W): the weight fake-quantizer only changes
  the forward values.

Merging into a quantized model is where quality silently goes: the model trained (or served
unmerged) computes Q(W) x + s B A x, the merged model Q(W + s B A) x, and these differ by the
re-quantization of the sum. `merge_drift` measures the logit and metric drift between the two.

What torchao 0.18 does on this CPU (x86, no CUDA), measured:
- works: int8 weights (IntxWeightOnlyConfig int8 per channel, stored as int8 + fp32 scales),
  int8 dynamic activations x int8 or int4 weights (Int8DynamicActivationIntxWeightConfig), NF4
  (NF4Tensor, dequantized per matmul), and QATConfig prepare/convert for the intx configs, whose
  fake quantization equals the converted model's dequantized weights exactly;
- int4 on CPU is stored one value per byte (`intx_packing_format="unpacked_to_int8"`), so it
  is no smaller than int8; the packed CPU formats fail here: "opaque_torchao_auto" (TorchAO
  kernel library is not loaded) and "opaque_aten_kleidiai" (needs KleidiAI, ARM);
- fails: Int4WeightOnlyConfig (the GPU int4 path): "plain"/"preshuffled" need the `mslk`
  package, "tile_packed_to_4d" asserts "Torch not compiled with CUDA enabled", "plain_int32"
  raises "does not support device 'cpu'". Scheme `int4-cuda` keeps that path for GPUs;
- every quantized CPU matmul here dequantizes or runs a reference kernel, so quantized models
  are smaller but not faster than fp32 on this machine (see `latency`).
"""

from __future__ import annotations

import copy
import io
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loralab.errors import UserError


# --------------------------------------------------------------------------------------------
# Schemes


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
    dtype = torch.int8 if scheme.weight == "int8" else torch.int4
    granularity = PerGroup(scheme.group_size) if scheme.group_size else PerAxis(0)
    if scheme.activations:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype,
                                                     weight_granularity=granularity)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


# --------------------------------------------------------------------------------------------
# A naive reference quantizer (the maths of the module docstring, for tests and docs)


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


# --------------------------------------------------------------------------------------------
# Which layers are quantized


def body_linears(model: nn.Module, scheme: Scheme | None = None) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` layers of the body: everything but the task head (lm_head / classifier,
    which stays float: it is trained, or tied to the embeddings) and, for grouped schemes,
    layers whose input width is not a multiple of the group size. Layers inside a LoRA wrapper
    are found under `<name>.base`. GPT-2's Conv1D layers are not `nn.Linear` (torchao skips
    them): `conv1d_to_linear` first, as `prepare_method` does."""
    from loralab.lora.targets import head_module_names

    heads = set(head_module_names(model))
    heads |= {f"{h}.base" for h in heads}
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in heads:
            continue
        if scheme is not None and scheme.weight == "nf4":
            if module.weight.numel() % scheme.group_size:  # NF4 blocks run over the flat weight
                continue
        elif scheme is not None and scheme.group_size and module.in_features % scheme.group_size:
            continue
        out.append((name, module))
    return out


@torch.no_grad()
def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers `Conv1D` (GPT-2: y = x W + b with W stored d_in x d_out) by the
    equivalent `nn.Linear` (weight W^T), in place, so torchao can quantize GPT-2's body. The
    function computed is unchanged. Returns how many layers were replaced."""
    from loralab.lora.layer import _set_submodule

    n = 0
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D":
            continue
        d_in, d_out = module.weight.shape
        layer = nn.Linear(d_in, d_out, bias=module.bias is not None,
                          device=module.weight.device, dtype=module.weight.dtype)
        layer.weight.copy_(module.weight.T)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
        layer.requires_grad_(module.weight.requires_grad)
        _set_submodule(model, name, layer)
        n += 1
    return n


def _require_linears(model: nn.Module, scheme: Scheme) -> list[tuple[str, nn.Linear]]:
    layers = body_linears(model, scheme)
    if not layers:
        raise UserError(f"no nn.Linear layers to quantize with scheme {scheme.name!r} in "
                        f"{type(model).__name__} (GPT-2's Conv1D layers are not supported by "
                        "torchao); use a Linear-based model such as smollm2-135m or minilm-l6")
    return layers


def _filter(layers: Iterable[tuple[str, nn.Module]]) -> Callable[[nn.Module, str], bool]:
    ids = {id(m) for _, m in layers}
    return lambda module, fqn: id(module) in ids


def _quiet_import_torchao() -> None:
    """Import torchao once with its C++-extension notices (CUDA-only kernels) silenced."""
    import contextlib
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), \
            contextlib.redirect_stdout(devnull):
        import torchao.quantization  # noqa: F401


# --------------------------------------------------------------------------------------------
# NF4


def _nf4_module():
    import importlib

    _quiet_import_torchao()
    return importlib.import_module("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")


def to_nf4(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """An NF4Tensor of `weight` (blocks run over the flattened weight): blocks of 64 values; the block absmaxes are double-quantized
    in blocks of 256 (QLoRA's defaults), or of the largest power of two dividing their count
    for small layers."""
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


# --------------------------------------------------------------------------------------------
# Real quantization (PTQ, quantized frozen bases) and QAT prepare / convert


def quantize_weights(model: nn.Module, scheme: Scheme | str) -> nn.Module:
    """Replace the body's linear weights by quantized tensors, in place (post-training
    quantization; or a QLoRA base when done before `apply_lora`). Returns the model."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    layers = _require_linears(model, scheme)
    if scheme.weight == "nf4":
        for _, layer in layers:
            layer.weight = nn.Parameter(to_nf4(layer.weight), requires_grad=False)
        return model
    _quiet_import_torchao()
    from torchao.quantization import quantize_

    quantize_(model, torchao_config(scheme), filter_fn=_filter(layers))
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
    import types

    n = 0
    for _, layer in body_linears(model):
        if is_quantized_tensor(layer.weight) and not layer.weight.requires_grad:
            layer.forward = types.MethodType(_packed_forward, layer)
            n += 1
    return n


def prepare_qat(model: nn.Module, scheme: Scheme | str) -> list[str]:
    """QAT prepare (torchao `QATConfig(base, step="prepare")`): every body linear becomes a
    `FakeQuantizedLinear` whose forward is F.linear(Q_a(x), Q_w(W), b). `LoRALinear` applies the
    same fake quantizers around its fused matmul. Call before `apply_lora`. Returns notes."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    if scheme.weight == "nf4":
        raise UserError("scheme 'nf4' has no fake-quantized (QAT) form in torchao; use it with "
                        "method qlora or lora-ptq, or pick int8, int8-dyn, int4 or int4-weight "
                        "for qat-lora")
    layers = _require_linears(model, scheme)
    _quiet_import_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(torchao_config(scheme), step="prepare"), filter_fn=_filter(layers))
    return [f"qat-lora: {len(layers)} linear layers fake-quantized ({scheme.name}: {scheme.note})"]


def convert_qat(model: nn.Module, scheme: Scheme | str) -> nn.Module:
    """QAT convert: every `FakeQuantizedLinear` (also one inside a LoRA wrapper) becomes an
    `nn.Linear` with really quantized weights, in place. Merge the adapters first to deploy
    Q(W + s B A); convert with the adapters in place to serve Q(W) x + s B A x."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    _quiet_import_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    quantize_(model, QATConfig(torchao_config(scheme), step="convert"),
              filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    return model


def quantize_tensor(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """One weight matrix quantized with `scheme` (through a throw-away nn.Linear)."""
    if scheme.weight == "nf4":
        return to_nf4(weight)
    from torchao.quantization import quantize_

    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype,
                      device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
    quantize_(layer, torchao_config(scheme), filter_fn=lambda m, fqn: m is layer)
    return layer.weight.detach()


@torch.no_grad()
def merge_into_quantized(model: nn.Module, scheme: Scheme | str) -> nn.Module:
    """Fold each adapter into its quantized base: W_q <- Q(deq(W_q) + s B A), then remove the
    adapters (in place). The float W is gone once a base is quantized, so the merge starts from
    deq(W_q); the re-quantization of the sum is the source of merge drift."""
    from loralab.lora.layer import _set_submodule, lora_modules, untie_weight

    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    for name, layer in lora_modules(model):
        base = layer.base
        if layer.conv1d or not is_quantized_tensor(base.weight):
            untie_weight(model, base)  # a tied lm_head must not change the embeddings
            layer.merge()
        else:
            merged = dequantize(base.weight).float() + layer.delta_weight().float()
            base.weight = nn.Parameter(quantize_tensor(merged.to(layer.lora_A.dtype), scheme),
                                       requires_grad=False)
        _set_submodule(model, name, base)
    return model


# --------------------------------------------------------------------------------------------
# Counting and sizing


def logical_numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for, not the storage elements holding them: torchao subclasses
    (NF4Tensor, IntxUnpackedToInt8Tensor, ...) report their logical shape; a bitsandbytes
    Params4bit packs two 4-bit values per byte and keeps the logical shape in `quant_state`."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    if shape is not None:
        return math.prod(shape)
    return math.prod(p.shape)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) logical parameter counts; shared (tied) tensors once."""
    trainable = total = 0
    for p in model.parameters():  # de-duplicates shared tensors
        n = logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: the sum over the inner tensors of a tensor subclass (packed
    data, scales, zero points), numel x element size for a plain tensor."""
    if is_quantized_tensor(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors once)."""
    seen: set[int] = set()
    n = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += tensor_bytes(t)
    return n


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """torch.save of the state dict (quantized tensors keep their packed form), written
    atomically. safetensors cannot hold torchao tensor subclasses; torch.load(weights_only=True)
    reads this back once torchao is imported."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(model.state_dict(), fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def disk_bytes(model: nn.Module) -> int:
    """Size of the model's state dict as `save_model` writes it."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


# --------------------------------------------------------------------------------------------
# Logits, drift and latency


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


# --------------------------------------------------------------------------------------------
# Deploying a trained LoRA model quantized (used by train.py for qat-lora, lora-ptq and qlora)


@dataclass(frozen=True)
class Deployment:
    """A trained adapter model turned into a quantized one, with what it cost."""

    model: nn.Module
    """Merged and really quantized: Q(W + s B A) (or, for qlora, Q(deq(Q(W)) + s B A))."""
    metrics: dict[str, dict]
    """Eval metrics of `model`."""
    info: dict[str, Any]
    """Unmerged metrics, logit and metric drift, sizes, latency: JSON-serialisable."""


def deploy(model: nn.Module, method: str, scheme: Scheme | str,
           evaluate_fn: Callable[[nn.Module], dict[str, dict]], batches: list[dict], *,
           adapter_metrics: dict[str, dict] | None = None, latency_repeats: int = 5
           ) -> Deployment:
    """Merge a trained LoRA model into a quantized one and measure the merge.

    method qat-lora: `model` has fake-quantized bases; unmerged = Q(W) + adapter (bases
    converted, adapters kept), merged = convert(merge) = Q(W + s B A).
    method lora-ptq: `model` is float + LoRA; unmerged = Q(W) + adapter, merged = Q(W + s B A);
    the float merged model W + s B A (what PTQ starts from) is sized and timed with them, so
    float+LoRA, PTQ-unmerged and PTQ-merged latencies come from the same interleaved rounds.
    method qlora: `model` already has quantized bases; unmerged is `model` itself, merged =
    Q(deq(Q(W)) + s B A), done in place (the adapters are folded into `model`).
    `evaluate_fn(model) -> {eval set: metrics}`; `batches` feed the logit drift and latency.
    `adapter_metrics` are the metrics of `model` as it stands (saves one evaluation).
    """
    from loralab.lora.layer import merge_lora

    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    float_bytes = 4 * count_parameters(model)[1]
    if method == "qlora":
        # merged in place: torchao's NF4Tensor cannot be deep-copied (its clone re-quantizes
        # with default block sizes), so the unmerged model is measured first
        unmerged_metrics = adapter_metrics if adapter_metrics is not None else evaluate_fn(model)
        unmerged_logits = collect_logits(model, batches)
        times = latency({"unmerged": model}, batches[0], repeats=latency_repeats) \
            if batches and latency_repeats else {}
        merged = merge_into_quantized(model, scheme)
        if times:
            times |= latency({"merged": merged}, batches[0], repeats=latency_repeats)
    else:
        merged = merge_and_quantize(copy.deepcopy(model), method, scheme)
        unmerged = copy.deepcopy(model)
        float_merged = None
        if method == "qat-lora":
            convert_qat(unmerged, scheme)
        else:  # lora-ptq
            float_merged = merge_lora(copy.deepcopy(model)).eval()
            quantize_weights(unmerged, scheme)  # the bases under the adapters too
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
    if adapter_metrics is not None and method != "qlora":
        info["adapter_metrics"] = adapter_metrics  # fake-quant (qat-lora) or float (lora-ptq)
    if method == "lora-ptq":
        info["float_model_bytes"] = disk_bytes(float_merged)  # the merged fp32 model
        del float_merged
    if times:
        info["latency"] = times
    return Deployment(merged, merged_metrics, info)


QUANT_METHODS = ("qat-lora", "qlora", "lora-ptq")


def prepare_method(model: nn.Module, method: str, scheme_name: str) -> list[str]:
    """Before `apply_lora`: qat-lora fake-quantizes the body (QAT prepare), qlora replaces its
    weights by quantized ones (the frozen QLoRA base), lora-ptq trains in float. Returns notes."""
    scheme = get_scheme(scheme_name)
    converted = conv1d_to_linear(model)
    notes = [f"{converted} Conv1D layers turned into equivalent nn.Linear layers (for torchao)"
             ] if converted else []
    return notes + _prepare_method(model, method, scheme)


def _prepare_method(model: nn.Module, method: str, scheme: Scheme) -> list[str]:
    if method == "qat-lora":
        return prepare_qat(model, scheme)
    if method == "qlora":
        if scheme.activations:
            raise UserError(f"qlora quantizes the stored base weights only; scheme "
                            f"{scheme.name!r} also quantizes activations: use int8, "
                            "int4-weight or nf4")
        before = weight_bytes(model)
        quantize_weights(model, scheme)
        keep_packed_in_backward(model)
        return [f"qlora: frozen base {scheme.name} ({scheme.note}); weights "
                f"{before / 1e6:.2f} MB -> {weight_bytes(model) / 1e6:.2f} MB"]
    return [f"lora-ptq: LoRA in float, then merged and post-training quantized ({scheme.name})"]


def finish_run(model: nn.Module, method: str, scheme_name: str, metrics: dict[str, dict],
               evaluate_fn: Callable[[nn.Module], dict[str, dict]], batches: list[dict],
               out: str | os.PathLike) -> tuple[dict[str, dict], dict[str, Any]]:
    """After training a quantization method: `deploy`, save the quantized model to
    `out/quantized/model.pt`, and return (metrics for the run record, the record's "quant"
    section). qat-lora and lora-ptq report the merged, really quantized model (what is
    deployed); qlora keeps the metrics of what it trained (quantized base + float adapter, how
    QLoRA adapters are served) and reports the merged model under "quant". Loading the run
    rebuilds the model of the recorded metrics from the adapter: `rebuild_recorded`."""
    dep = deploy(model, method, scheme_name, evaluate_fn, batches, adapter_metrics=metrics)
    path = save_model(dep.model, Path(out) / "quantized" / "model.pt")
    info = dict(dep.info)
    info["merged_metrics"] = dep.metrics
    info["quantized_model"] = str(path)
    info["quantized_model_bytes"] = path.stat().st_size
    info["logical_params"] = count_parameters(dep.model)[1]
    return (metrics if method == "qlora" else dep.metrics), info


def merge_and_quantize(model: nn.Module, method: str, scheme: Scheme | str) -> nn.Module:
    """The deployed model of qat-lora and lora-ptq, Q(W + s B A), from the trained adapter model
    (in place): merge the adapters, then convert the fake-quantized bases (qat-lora) or
    post-training quantize the merged weights (lora-ptq). Shared by `deploy` (which records its
    metrics) and `rebuild_recorded` (which loads a run), so both build the same model."""
    from loralab.lora.layer import merge_lora

    if method == "qat-lora":
        return convert_qat(merge_lora(model), scheme)
    if method == "lora-ptq":
        return quantize_weights(merge_lora(model), scheme)
    raise UserError(f"deploy: unknown method {method!r}; use qat-lora, lora-ptq or qlora")


def rebuild_recorded(model: nn.Module, method: str, scheme_name: str | None,
                     adapter: str | os.PathLike) -> nn.Module:
    """The model whose metrics a LoRA-family run recorded, rebuilt from its freshly loaded float
    base `model` and its saved adapter directory, in place (returns `model`):

        lora, lora-head   W + s B A         float base, adapter unmerged;
        qlora             Q(W) + s B A      base quantized with the run's scheme exactly as in
                                            training (`prepare_method`), then the adapter;
        qat-lora          Q(W + s B A)      QAT prepare, adapter, merge, convert (`deploy`);
        lora-ptq          Q(W + s B A)      adapter on the float base, merge, quantize.

    Quantization is deterministic, so this repeats `train`'s and `deploy`'s operations on the
    same tensors and re-evaluation reproduces the recorded metrics. `scheme_name` is needed for
    the three quantized methods only (a run's config `quant`)."""
    from loralab.lora.adapter import load_adapter

    if method not in QUANT_METHODS:
        return load_adapter(model, adapter)
    if not scheme_name:
        raise UserError(f"this {method} run records no quantization scheme (config 'quant'), "
                        "so its quantized model cannot be rebuilt; re-run it")
    prepare_method(model, method, scheme_name)
    load_adapter(model, adapter)
    if method == "qlora":
        return model
    return merge_and_quantize(model, method, scheme_name)


@torch.no_grad()
def dequantized_merge(model: nn.Module) -> nn.Module:
    """A plain float model computing what a (partly) quantized adapter model computes: every
    quantized weight W_q becomes deq(W_q), then every adapter is folded in, W' = deq(W_q) + s B A
    (in place; returns the model). Exact up to fp32 rounding of the sum, except for schemes that
    also quantize activations (int8-dyn, int4): that quantization lives in the forward of the
    quantized tensor, not in its values, and the float model computes activations in float."""
    from loralab.lora.layer import merge_lora

    for module in model.modules():  # own parameters only (a LoRA layer shows its base's)
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        if weight is not None and is_quantized_tensor(weight):
            module.weight = nn.Parameter(dequantize(weight).detach().clone(),
                                         requires_grad=False)
    return merge_lora(model)


@torch.no_grad()
def restore_conv1d(model: nn.Module) -> int:
    """Undo `conv1d_to_linear` (in place): every `nn.Linear` that is a transformers `Conv1D` in
    the model's architecture (found on a weightless meta-device copy built from its config)
    becomes that Conv1D again (weight W^T), so `save_pretrained` writes weights that
    `from_pretrained` reads with the right orientation. Returns how many layers were restored."""
    from transformers.pytorch_utils import Conv1D

    from loralab.lora.layer import _set_submodule

    from_config = getattr(type(model), "_from_config", None)
    if from_config is None:  # not a transformers model: no Conv1D architecture to return to
        return 0
    with torch.device("meta"):
        skeleton = from_config(model.config)
    names = [n for n, m in skeleton.named_modules() if isinstance(m, Conv1D)]
    del skeleton
    n = 0
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            continue
        layer = Conv1D(module.out_features, module.in_features)
        layer.to(device=module.weight.device, dtype=module.weight.dtype)
        layer.weight.copy_(module.weight.T)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
        else:
            layer.bias = None
        _set_submodule(model, name, layer)
        n += 1
    return n


MERGED_EXPORT = {
    "qlora": "dequant(Q(W)) + s B A in float: the function the run trained and evaluated "
             "(quantized base + adapter), with the base's quantization error baked in (not the "
             "original W + s B A); the re-quantized merge Q(dequant(Q(W)) + s B A) and its "
             "merge drift are in quantized/model.pt and record.json 'quant'",
    "qat-lora": "dequant(Q(W + s B A)) in float: the weights of the deployed quantized model "
                "whose metrics the run recorded (quantized/model.pt keeps them packed)",
    "lora-ptq": "dequant(Q(W + s B A)) in float: the weights of the deployed quantized model "
                "whose metrics the run recorded (quantized/model.pt keeps them packed)",
}
"""What `loralab merge --run` writes for each quantized method (shown to the user)."""


def float_export(model: nn.Module, method: str, scheme_name: str) -> tuple[nn.Module, str]:
    """(plain float transformers model, note for the user) of a run's rebuilt quantized model
    (`rebuild_recorded`): `dequantized_merge`, then GPT-2's Conv1D layers restored. Merging
    into the quantized base (re-quantizing W + s B A) would change the model (merge drift); the
    float export keeps exactly the recorded weights, at fp32 size."""
    scheme = get_scheme(scheme_name)
    model = dequantized_merge(model)
    restore_conv1d(model)
    note = f"{method} run: merged model = {MERGED_EXPORT[method]}"
    if scheme.activations:
        note += (f"; scheme {scheme.name} also quantized activations (int8 per token) in the "
                 "recorded model, the exported float model does not")
    return model, note


# --------------------------------------------------------------------------------------------
# The three-row comparison: float + LoRA, PTQ of it, QAT-LoRA then quantization


def compare_quantization(model: str = "minilm-l6", task: str = "classify",
                         data: str = "rt-snippets", scheme: str = "int8", *, out: str | os.PathLike,
                         max_steps: int = 40, batch_size: int = 16, seq_len: int = 64,
                         lr: float = 1e-3, rank: int = 8, preset: str = "qv",
                         data_fraction: float = 0.2, eval_examples: int = 256,
                         latency_repeats: int = 7, seed: int = 0,
                         progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Train LoRA in float and with QAT on the same data, order and budget, then deploy:

    row `float+lora`  the float LoRA model, merged (fp32);
    row `ptq`         that merged model, post-training quantized with `scheme`;
    row `qat-lora`    QAT-LoRA, merged and converted with `scheme`.

    Returns {"rows": [{name, metrics, model_bytes, latency_ms, ...}], "setup": {...}}: quality on
    the held-out split, size of the saved state dict, and the median forward latency on this
    CPU (the three models timed interleaved on the same batch, so machine load hits all alike).
    """
    from loralab.training import loop as train_mod
    from loralab.data.tasks import load_task_data
    from loralab.lora.layer import merge_lora
    from loralab.models.loading import load_model

    out = Path(out)
    get_scheme(scheme)
    common = dict(model=model, task=task, data=data, max_steps=max_steps, batch_size=batch_size,
                  seq_len=seq_len, lr=lr, rank=rank, preset=preset, data_fraction=data_fraction,
                  seed=seed, keep_best=False, warmup_steps=max(1, max_steps // 10))

    def pieces():
        loaded = load_model(model, task)
        task_data = load_task_data(data, task, loaded.tokenizer, seq_len=seq_len,
                                   data_fraction=data_fraction, seed=seed)
        split = "test" if "test" in task_data.splits else "validation"
        held = task_data.splits[split]
        held = held.select(range(min(eval_examples, len(held))))
        val = task_data.splits.get("validation", held)
        val = val.select(range(min(eval_examples, len(val))))
        import dataclasses

        td = dataclasses.replace(task_data, splits={"train": task_data.splits["train"],
                                                    "validation": val, split: held})
        return loaded, td

    rows: list[dict[str, Any]] = []
    progress(f"[1/2] float LoRA ({model}, {data}, {max_steps} steps)")
    loaded, td = pieces()
    cfg = train_mod.make_config(common, method="lora", out=str(out / "float-lora"))
    rec_float = train_mod.train(cfg, loaded=loaded, task_data=td)
    float_model = merge_lora(loaded.model).eval()
    batches = _eval_batches(td, batch_size)

    def evaluate(m: nn.Module) -> dict[str, dict]:
        return {k: train_mod.evaluate(m, v, td.collate_fn, cfg)
                for k, v in td.splits.items() if k != "train"}

    ptq_model = quantize_weights(copy.deepcopy(float_model), scheme)
    progress(f"[2/2] QAT-LoRA ({scheme})")
    loaded_q, td_q = pieces()
    cfg_q = train_mod.make_config(common, method="qat-lora", quant=scheme,
                                  out=str(out / "qat-lora"))
    rec_qat = train_mod.train(cfg_q, loaded=loaded_q, task_data=td_q)
    # train() evaluated the deployed model on copies; rebuild it here: Q(W + s B A)
    qat_model = convert_qat(merge_lora(loaded_q.model), scheme).eval()
    models = {"float+lora": float_model, "ptq": ptq_model, "qat-lora": qat_model}
    times = latency(models, batches[0], repeats=latency_repeats)
    for name, m in models.items():
        metrics = rec_float["metrics"] if name == "float+lora" else (
            rec_qat["metrics"] if name == "qat-lora" else evaluate(m))
        path = save_model(m, out / "models" / f"{name}.pt")
        rows.append({"name": name, "metrics": metrics, "model_bytes": path.stat().st_size,
                     "weight_bytes": weight_bytes(m), "params": count_parameters(m)[1],
                     "latency_ms": times[name]["median_ms"], "latency_spread_ms":
                     [times[name]["min_ms"], times[name]["max_ms"]]})
    rows[1]["drift_vs_float"] = logit_drift(float_model, ptq_model, batches)
    rows[2]["drift_vs_float"] = logit_drift(float_model, qat_model, batches)
    rows[2]["merge"] = rec_qat.get("quant", {})
    return {"rows": rows, "setup": {**common, "scheme": scheme, "eval_examples": eval_examples,
                                    "latency_batch": list(batches[0]["input_ids"].shape),
                                    "threads": torch.get_num_threads()}}


def training_step_memory(model_name: str = "minilm-l6", task: str = "classify",
                         scheme: str | None = "nf4", *, batch_size: int = 8, seq_len: int = 64,
                         rank: int = 8, preset: str = "qv", seed: int = 0) -> dict[str, Any]:
    """Memory of one LoRA training step (forward, backward, AdamW step) on a float base
    (scheme None) or a quantized frozen base (QLoRA): weight bytes, logical parameters, the
    tensor-level peak (parameters + gradients + optimizer state + tensors saved for backward)
    and the process's peak RSS increase over the step. Run each scheme in a fresh process for
    a clean RSS figure (benchmarks/quant_bench.py --memory does)."""
    from loralab.costs import measure
    from loralab.lora.layer import apply_lora, LoRAConfig, lora_parameters
    from loralab.models.loading import load_model

    torch.manual_seed(seed)
    model = load_model(model_name, task).model
    float_bytes = weight_bytes(model)
    if scheme is not None:
        conv1d_to_linear(model)
        quantize_weights(model, scheme)
        keep_packed_in_backward(model)
    apply_lora(model, LoRAConfig(rank=rank, targets=preset, train_head=task == "classify"))
    trainable, total = count_parameters(model)
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    labels = (torch.randint(0, 2, (batch_size,), generator=g) if task == "classify" else ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    tracker = measure.SavedTensorTracker(skip=measure.storage_pointers(model.parameters()))
    sampler = measure.RSSSampler().start()
    t0 = time.perf_counter()
    with tracker.track():
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    rss = sampler.stop()
    return {"model": model_name, "scheme": scheme or "float", "float_weight_bytes": float_bytes,
            "weight_bytes": weight_bytes(model), "logical_params": total,
            "trainable_params": trainable, "lora_params": sum(p.numel() for p in
                                                              lora_parameters(model)),
            "saved_activation_bytes": tracker.peak,
            "peak_tensor_bytes": measure.static_tensor_bytes(model, opt) + tracker.peak,
            "peak_rss_delta_bytes": rss, "step_seconds": seconds,
            "batch": [batch_size, seq_len]}


def _eval_batches(task_data: Any, batch_size: int, n: int = 4) -> list[dict]:
    """Up to n batches of the held-out split (test, else validation) for drift and latency."""
    split = "test" if "test" in task_data.splits else "validation"
    ds = task_data.splits[split]
    out = []
    for start in range(0, min(len(ds), n * batch_size), batch_size):
        rows = [ds[i] for i in range(start, min(len(ds), start + batch_size))]
        out.append(task_data.collate_fn(rows))
    return out


def format_comparison(result: dict[str, Any]) -> str:
    """A plain-text table of `compare_quantization`'s rows."""
    rows = result["rows"]
    split = next(iter(rows[0]["metrics"]))
    for cand in ("test", "validation"):
        if cand in rows[0]["metrics"]:
            split = cand
            break
    keys = [k for k in ("accuracy", "f1", "perplexity", "loss") if k in rows[0]["metrics"][split]]
    header = ["row"] + [f"{split} {k}" for k in keys] + ["model MB", "weights MB", "params",
                                                          "latency ms (median)", "KL vs float"]
    lines = []
    for r in rows:
        m = r["metrics"].get(split, {})
        kl = r.get("drift_vs_float", {}).get("mean_kl")
        lines.append([r["name"]] + [f"{m.get(k, float('nan')):.4f}" for k in keys]
                     + [f"{r['model_bytes'] / 1e6:.2f}", f"{r['weight_bytes'] / 1e6:.2f}",
                        f"{r['params']:,}", f"{r['latency_ms']:.1f}",
                        "–" if kl is None else f"{kl:.2e}"])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])


__all__ = [
    "SCHEMES", "Scheme", "get_scheme", "torchao_config", "reference_fake_quantize",
    "reference_fake_quantize_per_token", "body_linears", "to_nf4", "is_quantized_tensor",
    "dequantize", "quantize_weights", "prepare_qat", "convert_qat", "quantize_tensor",
    "merge_into_quantized", "conv1d_to_linear", "logical_numel", "count_parameters", "tensor_bytes", "weight_bytes",
    "save_model", "disk_bytes", "collect_logits", "drift", "logit_drift", "metric_drift", "latency", "Deployment", "deploy",
    "compare_quantization", "format_comparison", "QUANT_METHODS", "prepare_method",
    "finish_run", "training_step_memory", "keep_packed_in_backward", "merge_and_quantize",
    "rebuild_recorded", "dequantized_merge", "restore_conv1d", "float_export",
]
