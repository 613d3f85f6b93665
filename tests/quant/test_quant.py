"""loralab.quant with real torchao on tiny random models: fake-quant numerics vs a naive
reference, STE gradients, QAT-LoRA / QLoRA / PTQ training runs, sizes, logical parameter counts,
merge drift, and clear errors for what this CPU cannot do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import randomise_adapters, tiny_bert, tiny_llama, token_ids
from loralab import quant
from loralab.errors import UserError
from loralab.lora.config import LoRAConfig
from loralab.lora.inject import apply_lora, lora_modules, lora_parameters

pytest.importorskip("torchao")



# --- fake-quant numerics ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["int8", "int8-dyn", "int4", "int4-weight"])
def test_fake_quant_weights_match_naive_reference_and_the_converted_model(name):
    torch.manual_seed(0)
    scheme = quant.get_scheme(name)
    model = nn.Sequential(nn.Linear(64, 48))
    w = model[0].weight.detach().clone()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(quant.torchao_config(scheme), step="prepare"))
    fq = model[0].weight_fake_quantizer(model[0].weight).detach()
    ref = quant.reference_fake_quantize(w, scheme.weight_bits, scheme.group_size)
    torch.testing.assert_close(fq, ref, rtol=0, atol=1e-6)
    assert (fq - w).abs().max() > 0  # it really quantizes
    quantize_(model, QATConfig(quant.torchao_config(scheme), step="convert"))
    assert quant.is_quantized_tensor(model[0].weight)
    # what QAT trains against is exactly what is deployed
    torch.testing.assert_close(quant.dequantize(model[0].weight), fq, rtol=0, atol=0)


def test_fake_quant_activations_match_naive_per_token_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(quant.torchao_config(quant.get_scheme("int8-dyn")),
                               step="prepare"))
    x = torch.randn(5, 7, 64) * 3
    torch.testing.assert_close(model[0].activation_fake_quantizer(x),
                               quant.reference_fake_quantize_per_token(x), rtol=0, atol=1e-5)


# --- STE gradients and training -----------------------------------------------------------

def test_ste_gradients_reach_a_and_b_through_fake_quantized_activations():
    torch.manual_seed(0)
    model = tiny_llama()
    quant.prepare_qat(model, "int8-dyn")
    apply_lora(model, LoRAConfig(rank=4, targets="qv"))
    randomise_adapters(model)
    model(**token_ids()).logits.pow(2).mean().backward()
    grads = [p.grad for p in lora_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # the first layer's adapters only get gradient through later layers' fake-quantized inputs
    first = lora_modules(model)[0][1]
    assert first.base.activation_fake_quantizer is not None
    # frozen base: no weight gradients anywhere
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_lora_layer_uses_fake_quantized_base_in_forward():
    torch.manual_seed(0)
    model = tiny_llama()
    quant.prepare_qat(model, "int4-weight")
    apply_lora(model, LoRAConfig(rank=4, targets="qv"))
    name, layer = lora_modules(model)[0]
    x = torch.randn(3, layer.in_features)
    w_q = quant.reference_fake_quantize(layer.base.weight.detach(), 4, 32)
    torch.testing.assert_close(layer(x), x @ w_q.T, rtol=1e-5, atol=1e-5)  # B = 0 at init


def _train(tmp_path, model, method: str, scheme: str, task: str = "lm", **kw) -> dict:
    from test_train import run

    return run(tmp_path, model=model, name=f"{method}-{scheme}", method=method, quant=scheme,
               task=task, **kw)


def test_qat_lora_train_steps_reduce_the_loss_of_a_batch():
    torch.manual_seed(0)
    model = tiny_llama()
    quant.prepare_qat(model, "int8-dyn")
    apply_lora(model, LoRAConfig(rank=4, targets="all"))
    batch = token_ids(4, 12)
    ids = batch["input_ids"]
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)

    def loss() -> torch.Tensor:
        logits = model(**batch).logits[:, :-1]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1))

    before = float(loss())
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss()) < before - 0.05


@pytest.mark.slow
def test_qat_lora_run_reports_the_quantized_model_and_merge_drift(tmp_path):
    torch.manual_seed(0)
    rec = _train(tmp_path, tiny_llama(), "qat-lora", "int8-dyn", max_steps=2)
    q = rec["quant"]
    assert q["scheme"] == "int8-dyn" and q["quantized_layers"] > 0
    # the record's metrics are those of the merged, really quantized model
    assert rec["metrics"]["validation"] == q["merged_metrics"]["validation"]
    assert set(q["merge_logit_drift"]) == {"max_abs", "mean_abs", "rel_mean_abs", "mean_kl",
                                           "top1_agreement"}
    assert "loss" in q["merge_metric_drift"]["validation"]
    assert rec["costs"]["quantized_model_bytes"] > 0 and rec["costs"]["latency_ms"] > 0
    assert rec["artifacts"]["adapter"] and rec["artifacts"]["quantized_model"]


# --- quantized frozen bases (QLoRA), sizes and logical parameter counts ----------------------

@pytest.mark.parametrize("name", ["int8", "nf4", "int4-weight"])
def test_qlora_base_counts_logical_parameters_and_saves_weight_bytes(name):
    torch.manual_seed(0)
    float_model = tiny_llama()
    model = copy.deepcopy(float_model)
    quant.quantize_weights(model, name)
    layers = quant.body_linears(model)
    assert layers and all(quant.is_quantized_tensor(m.weight) for _, m in layers)
    # logical parameters: the quantized model stands for exactly the float model's parameters
    assert quant.count_parameters(model)[1] == quant.count_parameters(float_model)[1]
    assert quant.count_parameters(model)[1] == quant.count_parameters(float_model)[1]
    inner = sum(getattr(m.weight, n).numel() for _, m in layers
                for n in m.weight.__tensor_flatten__()[0])
    assert inner != sum(m.weight.numel() for _, m in layers)  # storage elements differ
    packed = quant.weight_bytes(model)
    assert packed < quant.weight_bytes(float_model)
    naive = sum(t.numel() * 4 for t in [*float_model.parameters(), *float_model.buffers()])
    assert quant.weight_bytes(float_model) == naive
    # the body's weights shrink: 8-bit ~1/4, 4-bit NF4 ~1/8 (+ scales)
    body_float = sum(m.weight.numel() * 4 for _, m in quant.body_linears(float_model))
    body_q = sum(quant.tensor_bytes(m.weight) for _, m in layers)
    assert body_q < (0.30 if name != "nf4" else 0.16) * body_float
    apply_lora(model, LoRAConfig(rank=4, targets="qv"))
    trainable, total = quant.count_parameters(model)
    lora = sum(p.numel() for p in lora_parameters(model))
    assert (trainable, total) == (lora, quant.count_parameters(float_model)[1] + lora)


def test_count_parameters_reads_bitsandbytes_style_packed_shape():
    class Params4bit(nn.Parameter):  # stands in for bitsandbytes: two 4-bit values per byte
        pass

    class State:
        shape = torch.Size([64, 32])

    p = Params4bit(torch.zeros(1024, 1, dtype=torch.uint8), requires_grad=False)
    p.quant_state = State()
    assert quant.logical_numel(p) == 2048


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_qlora_gradients_match_a_float_base_holding_the_dequantized_weights(name):
    torch.manual_seed(0)
    model = tiny_llama()
    quant.quantize_weights(model, name)
    assert quant.keep_packed_in_backward(model) == len(quant.body_linears(model))
    ref = tiny_llama()
    ref.load_state_dict({k: quant.dequantize(v) for k, v in model.state_dict().items()})
    for m in (model, ref):
        torch.manual_seed(1)
        apply_lora(m, LoRAConfig(rank=4, targets="qv"))
        randomise_adapters(m)
        m(**token_ids()).logits.pow(2).mean().backward()
    for p, r in zip(lora_parameters(model), lora_parameters(ref), strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6)


def test_quantized_base_saves_no_float_weight_copies_for_backward():
    torch.manual_seed(0)
    model = tiny_bert()  # linear layers with biases
    quant.quantize_weights(model, "int8")
    assert quant.keep_packed_in_backward(model) == len(quant.body_linears(model))
    apply_lora(model, LoRAConfig(rank=4, targets="qv"))
    float_shapes = {tuple(m.weight.shape) for _, m in quant.body_linears(model)}
    float_shapes |= {s[::-1] for s in float_shapes}
    saved = []

    def pack(t):
        if not quant.is_quantized_tensor(t) and t.dtype == torch.float32:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**token_ids()).logits.sum()
    assert not float_shapes & set(saved)  # no dequantized (d_out, d_in) weight kept


@pytest.mark.slow
def test_qlora_run_measures_memory_and_merge_drift(tmp_path):
    torch.manual_seed(0)
    rec = _train(tmp_path, tiny_llama(), "qlora", "nf4", max_steps=3)
    q = rec["quant"]
    assert q["merged_weight_bytes"] < q["float_weight_bytes"]
    assert rec["costs"]["total_params"] == quant.count_parameters(tiny_llama())[1] + \
        rec["costs"]["trainable_params"]
    assert rec["costs"]["peak_tensor_bytes"] > 0
    assert "validation" in q["merge_metric_drift"] and q["merge_logit_drift"]["max_abs"] >= 0


# --- PTQ and merging into a quantized model ---------------------------------------------------

def test_ptq_model_is_smaller_on_disk_than_float():
    torch.manual_seed(0)
    model = tiny_bert()
    small = quant.quantize_weights(copy.deepcopy(model), "int8")
    assert quant.disk_bytes(small) < quant.disk_bytes(model)  # the embeddings stay float
    assert quant.count_parameters(small)[1] == quant.count_parameters(model)[1]


@pytest.mark.parametrize("name", ["int8", "nf4"])
def test_merge_into_quantized_reports_drift_and_keeps_tied_embeddings(name):
    torch.manual_seed(0)
    float_model = tiny_llama()  # lm_head tied to the embeddings, adapted by preset "all"
    emb = float_model.get_input_embeddings().weight.detach().clone()
    model = quant.quantize_weights(copy.deepcopy(float_model), name)
    batches = [token_ids()]
    # scale of one quantization: the float model vs its quantized copy
    ptq = quant.drift(quant.collect_logits(float_model, batches),
                      quant.collect_logits(model, batches))
    apply_lora(model, LoRAConfig(rank=4, targets="all"))
    randomise_adapters(model)
    unmerged = quant.collect_logits(model, batches)  # Q(W) x + s B A x
    merged = quant.merge_into_quantized(model, name)  # Q(deq(Q(W)) + s B A) x
    assert not lora_modules(merged)
    torch.testing.assert_close(merged.get_input_embeddings().weight, emb)
    d = quant.drift(unmerged, quant.collect_logits(merged, batches))
    # re-quantizing the sum moves the logits: measurably, and by the order of one quantization
    # (a wrong merge, e.g. into a tied head that also moves the embeddings, is far off)
    assert 0 < d["mean_abs"] < 3 * ptq["mean_abs"]
    assert d["top1_agreement"] > 0.8


# --- what this machine cannot do ----------------------------------------------------------

def test_unsupported_configs_are_clear_user_errors():
    with pytest.raises(UserError, match="unknown quantization scheme"):
        quant.get_scheme("int3")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA GPU.*mslk"):
            quant.get_scheme("int4-cuda")
    with pytest.raises(UserError, match="no fake-quantized"):
        quant.prepare_qat(tiny_llama(), "nf4")
    from conftest import tiny_gpt2

    with pytest.raises(UserError, match="Conv1D"):  # prepare_qat alone: GPT-2 has no Linear
        quant.prepare_qat(tiny_gpt2(), "int8")


def test_int4_cuda_path_fake_quant_numerics_run_on_cpu():
    """The GPU scheme's QAT config (Int4WeightOnlyConfig -> int4 grouped fake quantization in
    bf16) can be exercised on CPU; only its real int4 kernels need CUDA."""
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

    act, weight = _infer_fake_quantize_configs(quant.torchao_config(quant.SCHEMES["int4-cuda"]))
    assert act is None and weight.group_size == 128
    from torchao.quantization.qat import FakeQuantizedLinear

    layer = FakeQuantizedLinear(256, 8, bias=False, weight_config=weight)
    w = layer.weight_fake_quantizer(layer.weight.detach().bfloat16()).float()
    levels = [len(torch.unique(g)) for g in w.reshape(8, 2, 128).reshape(16, 128)]
    assert max(levels) <= 16  # 4 bits: at most 16 values per group
    assert (w - layer.weight.detach()).abs().max() < 0.2 * layer.weight.detach().abs().max()


# --- float export of a quantized adapter model ------------------------------------------------

@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_dequantized_merge_is_a_float_model_computing_the_quantized_adapter_model(scheme):
    torch.manual_seed(0)
    model = quant.quantize_weights(tiny_llama(), scheme)
    apply_lora(model, LoRAConfig(rank=4, targets="all"))
    randomise_adapters(model)
    with torch.no_grad():
        ref = model(**token_ids()).logits  # Q(W) x + s B A x
        layer = lora_modules(model)[0][1]
        by_hand = quant.dequantize(layer.base.weight) + layer.delta_weight()
        merged = quant.dequantized_merge(model)
        assert not lora_modules(merged)
        assert not any(quant.is_quantized_tensor(p) for p in merged.parameters())
        torch.testing.assert_close(merged.get_submodule(lora_modules_name(layer, merged)).weight,
                                   by_hand, rtol=0, atol=0)
        # x (deq(Q(W)) + s B A)^T vs x deq(Q(W))^T + (x A^T) B^T s: the same function, fp32
        # rounding of differently ordered sums only (logits ~1, eps 1.2e-7, few layers)
        torch.testing.assert_close(merged(**token_ids()).logits, ref, rtol=1e-5, atol=1e-5)


def lora_modules_name(layer: nn.Module, merged: nn.Module) -> str:
    """The module name of the (former) base of LoRA layer `layer` in the merged model."""
    return next(n for n, m in merged.named_modules() if m is layer.base)
