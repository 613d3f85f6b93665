"""Quantization for LoRA: schemes, fake quantization for QAT, quantized frozen bases (QLoRA),
merging adapters into quantized weights, deployment with its merge drift, sizes and latency.

Modules, each one responsibility (imports point down this list):

    schemes   the formats (int8, int8-dyn, int4, int4-weight, nf4, int4-cuda), torchao configs
    layers    which layers are quantized (the body's nn.Linear), GPT-2 Conv1D <-> Linear
    tensors   NF4, quantized tensor subclasses: dequantize, quantize one matrix, sizes
    sizes     logical parameter counts, bytes in memory and on disk, saving packed models
    drift     logits, logit / metric drift, interleaved latency
    qat       fake quantization (QAT prepare / convert) and naive reference quantizers
    weights   real quantization of a frozen base, with a backward that keeps it packed
    merge     folding adapters into quantized weights, float export of a quantized model
    deploy    merged vs unmerged quantized model, measured (the record's "quant" section)

Nothing here knows the fine-tuning methods: the strategies in `loralab.training.strategies`
decide which of these operations a method runs and pass the facts in.
"""

from loralab.quant.deploy import Deployment, deploy, save_deployment
from loralab.quant.drift import collect_logits, drift, latency, logit_drift, metric_drift
from loralab.quant.layers import body_linears, conv1d_to_linear, restore_conv1d
from loralab.quant.merge import dequantized_float, dequantized_merge, merge_into_quantized
from loralab.quant.qat import (
    convert_qat,
    prepare_qat,
    reference_fake_quantize,
    reference_fake_quantize_per_token,
)
from loralab.quant.schemes import SCHEMES, Scheme, as_scheme, get_scheme, torchao_config
from loralab.quant.sizes import count_parameters, disk_bytes, save_model, weight_bytes
from loralab.quant.tensors import (
    dequantize,
    is_quantized_tensor,
    logical_numel,
    quantize_tensor,
    tensor_bytes,
    to_nf4,
)
from loralab.quant.weights import keep_packed_in_backward, quantize_weights

__all__ = [
    "SCHEMES", "Deployment", "Scheme", "as_scheme", "body_linears", "collect_logits",
    "conv1d_to_linear", "convert_qat", "count_parameters", "deploy", "dequantize",
    "dequantized_float", "dequantized_merge", "disk_bytes", "drift", "get_scheme",
    "is_quantized_tensor", "keep_packed_in_backward", "latency", "logical_numel", "logit_drift",
    "merge_into_quantized", "metric_drift", "prepare_qat", "quantize_tensor", "quantize_weights",
    "reference_fake_quantize", "reference_fake_quantize_per_token", "restore_conv1d",
    "save_deployment", "save_model", "tensor_bytes", "to_nf4", "torchao_config", "weight_bytes",
]
