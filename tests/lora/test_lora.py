"""The LoRA layer against a naive autograd reference, its memory, merging and surgery."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from loralab import LoRAConfig, apply_lora, merge_lora
from loralab.lora.dropout import draw_seed, dropout_mask
from loralab.errors import UserError
from loralab.lora.layer import (
    LoRALinear,
    lora_matmul,
    lora_modules,
    lora_parameters,
    merge_adapters,
    unmerge_adapters,
)


def naive(x, weight, bias, a, b, scale, slices, mask=None, conv1d=False):
    """y = x W^T + b + s (D(x) A_j^T) B_j^T on each slice, by plain autograd ops."""
    w = weight.T if conv1d else weight
    out = x @ w.T + bias
    xd = x * mask if mask is not None else x
    rank = a.shape[0] // len(slices)
    parts, row = [], 0
    for j, (lo, hi) in enumerate(slices):
        delta = (xd @ a[j * rank:(j + 1) * rank].T) @ b[row:row + hi - lo].T * scale
        parts.append((lo, hi, delta))
        row += hi - lo
    pad = torch.zeros_like(out)
    for lo, hi, delta in parts:
        pad = pad.index_add(-1, torch.arange(lo, hi), delta)
    return out + pad


CASES = [  # (conv1d, d_in, d_out, slices)
    (False, 12, 20, ((0, 20),)),
    (True, 12, 20, ((0, 20),)),
    (True, 12, 24, ((0, 8), (16, 24))),            # fused c_attn, q and v
    (True, 12, 24, ((0, 8), (8, 16), (16, 24))),   # fused c_attn, q, k and v
]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("conv1d,d_in,d_out,slices", CASES)
def test_gradients_match_naive_reference(conv1d, d_in, d_out, slices, p):
    torch.manual_seed(1)
    rank, scale = 3, 2.5
    width = sum(hi - lo for lo, hi in slices)
    x = torch.randn(2, 5, d_in, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(d_in, d_out, dtype=torch.float64) if conv1d else \
        torch.randn(d_out, d_in, dtype=torch.float64)
    bias = torch.randn(d_out, dtype=torch.float64)
    a = torch.randn(len(slices) * rank, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(width, rank, dtype=torch.float64, requires_grad=True)
    seed = 1234
    y = lora_matmul(x, weight, bias, a, b, scale, slices, p, seed, conv1d)
    mask = dropout_mask(torch.Size((10, d_in)), p, seed, x.device, x.dtype).view(2, 5, d_in) \
        if p > 0 else None
    x_ref, a_ref, b_ref = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y_ref = naive(x_ref, weight, bias, a_ref, b_ref, scale, slices, mask, conv1d)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(a.grad, a_ref.grad)
    torch.testing.assert_close(b.grad, b_ref.grad)


def test_dropout_is_real_and_reproducible():
    layer = LoRALinear(nn.Linear(16, 16), rank=4, scale=1.0, dropout=0.5).train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 16)
    torch.manual_seed(7)
    y1 = layer(x)
    torch.manual_seed(7)
    y2 = layer(x)
    y3 = layer(x)
    torch.testing.assert_close(y1, y2)
    assert not torch.allclose(y2, y3)              # a fresh mask each call
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))  # no dropout in eval


def test_module_dropout_matches_reference_mask():
    """The module draws its seed from torch's RNG; replaying that draw gives the same mask."""
    base = nn.Linear(8, 6)
    layer = LoRALinear(base, rank=2, scale=3.0, dropout=0.25).train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 8)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    mask = dropout_mask(x.shape, 0.25, draw_seed(), x.device, x.dtype)
    ref = naive(x, base.weight, base.bias, layer.lora_A, layer.lora_B, 3.0, ((0, 6),), mask)
    torch.testing.assert_close(y, ref)


def _saved_tensors(fn):
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("conv1d", [False, True])
def test_saved_for_backward_holds_no_output_sized_tensor(conv1d, p):
    """The LoRA branch keeps x (shared with the caller), A, B, a reference to W and the small
    u = D(x) A^T (T x k r); with dropout also the mask's 16-bit uniforms (half of x's fp32
    bytes). No T x d_out tensor and no second (dropped) copy of x."""
    d_in, d_out, tokens = 64, 96, 4 * 32
    base = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
    base.requires_grad_(False)
    slices = ((0, 32), (64, 96)) if conv1d else None
    layer = LoRALinear(base, rank=4, scale=2.0, dropout=p, slices=slices).train()
    x = torch.randn(4, 32, d_in, requires_grad=True)
    _, saved = _saved_tensors(lambda: layer(x))
    params = {base.weight.data_ptr(), layer.lora_A.data_ptr(), layer.lora_B.data_ptr()}
    new = [t for t in saved if t.data_ptr() not in params]
    k_r = layer.lora_A.shape[0]
    assert new[0].data_ptr() == x.data_ptr()                       # x itself, not a copy
    assert new[1].shape == (tokens, k_r)                           # u
    if p > 0:
        assert len(new) == 3 and new[2].dtype == torch.int16 and new[2].shape == (tokens, d_in)
    else:
        assert len(new) == 2
    assert all(t.numel() < tokens * d_out for t in saved if t.data_ptr() not in params)
    extra_bytes = sum(t.numel() * t.element_size() for t in new[1:])
    assert extra_bytes == tokens * k_r * 4 + (tokens * d_in * 2 if p > 0 else 0)
    assert extra_bytes < x.numel() * x.element_size()             # PEFT keeps a full copy


def test_naive_peft_style_layer_keeps_more():
    """The measurement can fail: the PEFT-style composition saves output-sized tensors."""
    base = nn.Linear(64, 96).requires_grad_(False)
    lora_a, lora_b, drop = nn.Linear(64, 4, bias=False), nn.Linear(4, 96, bias=False), \
        nn.Dropout(0.1)
    x = torch.randn(128, 64, requires_grad=True)
    _, saved = _saved_tensors(lambda: base(x) + lora_b(lora_a(drop(x))) * 2.0)
    params = {p.data_ptr() for p in (base.weight, lora_a.weight, lora_b.weight)}
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in params)
    assert extra > x.numel() * x.element_size()


def test_frozen_weight_gets_no_gradient():
    base = nn.Linear(8, 8).requires_grad_(False)
    layer = LoRALinear(base, rank=2, scale=1.0)
    layer(torch.randn(3, 8, requires_grad=True)).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_unfrozen_weight_gradient_matches_reference():
    base = nn.Linear(8, 5)
    layer = LoRALinear(base, rank=2, scale=1.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 8)
    layer(x).square().sum().backward()
    ref = nn.Linear(8, 5)
    ref.load_state_dict(base.state_dict())
    with torch.no_grad():
        ref.weight += 1.5 * layer.lora_B @ layer.lora_A
    ref(x).square().sum().backward()
    torch.testing.assert_close(base.weight.grad, ref.weight.grad)
    torch.testing.assert_close(base.bias.grad, ref.bias.grad)


def test_bf16_autocast_matches_naive():
    layer = LoRALinear(nn.Linear(32, 16), rank=4, scale=2.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = layer.base(x) + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert y.dtype == torch.bfloat16
    # two bf16 paths (8-bit mantissa: one ulp is 0.4%; native on AMX, emulated on AVX2) differ
    # by ~1 ulp (0.031 at |y| ~5, measured); rtol 2% is 5 ulps, atol 0.1 covers outputs near 0
    # left by cancelling terms of size ~3
    torch.testing.assert_close(y.float(), ref.float(), atol=0.1, rtol=0.02)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, tiny_bert])
@pytest.mark.parametrize("preset", ["qv", "attn", "attn-proj", "attn-proj-ffn", "all"])
def test_untrained_adapter_leaves_outputs_unchanged(make, preset):
    model = make()
    x = torch.randint(0, 128, (2, 12))
    before = model(x).logits
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=preset))
    # exact on purpose: the base path is the same addmm/linear on the same 2-D input, and B = 0
    # adds exact zeros, so any CPU gives the same bits
    torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, tiny_bert])
@pytest.mark.parametrize("preset", ["qv", "attn-proj-ffn", "all"])
def test_merge_unmerge_round_trip(make, preset):
    model = make()
    x = torch.randint(0, 128, (2, 12))
    base_logits = model(x).logits
    apply_lora(model, LoRAConfig(rank=4, alpha=32, targets=preset))
    for _, layer in lora_modules(model):
        # a trained-adapter magnitude: moves these logits by ~1e-2..1 (BERT's tiny init logits
        # are ~1e-2, so its B is larger)
        nn.init.normal_(layer.lora_B, std=0.5 if make is tiny_bert else 0.05)
    adapted = model(x).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    # x (W + s B A)^T vs x W^T + s (x A^T) B^T: fp32 roundings in another order, through every
    # layer; measured <= 2.2e-6 ("all": the head too) here and with MKL_CBWR=COMPATIBLE
    # ATEN_CPU_CAPABILITY=default (other GEMM kernels); 3e-5 (+1e-5 relative for logits ~1.5)
    # is >10x that and 30x below the 1e-3 an adapter must move the logits (above)
    tol = {"atol": 3e-5, "rtol": 1e-5}
    merge_adapters(model)
    torch.testing.assert_close(model(x).logits, adapted, **tol)
    unmerge_adapters(model)
    torch.testing.assert_close(model(x).logits, adapted, **tol)
    plain = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(x).logits, adapted, **tol)


def test_merged_model_saves_and_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()  # tied lm_head: merging into it must not change the embeddings
    embeddings = model.get_input_embeddings().weight.detach().clone()
    x = torch.randint(0, 128, (2, 12))
    apply_lora(model, LoRAConfig(rank=4, alpha=32, targets="all"))
    for _, layer in lora_modules(model):
        nn.init.normal_(layer.lora_B, std=0.05)
    adapted = model(x).logits
    plain = merge_lora(model)
    assert torch.equal(plain.get_input_embeddings().weight, embeddings)
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    # merged vs adapted: as in test_merge_unmerge_round_trip (2.2e-6 measured)
    torch.testing.assert_close(reloaded(x).logits, adapted, atol=3e-5, rtol=1e-5)


def test_merge_without_a_head_adapter_keeps_gpt2_tied_and_reloadable(tmp_path):
    from transformers import GPT2LMHeadModel

    model = tiny_gpt2()  # tied lm_head, adapters on the body only
    x = torch.randint(0, 128, (2, 12))
    apply_lora(model, LoRAConfig(rank=4, targets="qv"))
    for _, layer in lora_modules(model):
        nn.init.normal_(layer.lora_B, std=0.05)
    adapted = model(x).logits
    plain = merge_lora(model)
    # a LoRA wrapper's `weight` property is not a second owner of its base weight: the merge
    # must not untie (a tied config with the head saved once keeps from_pretrained exact)
    assert plain.lm_head.weight is plain.transformer.wte.weight
    assert plain.config.tie_word_embeddings
    plain.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    # W + s B A summed once vs x W + (x A^T) B^T s: fp32 rounding only
    torch.testing.assert_close(reloaded(x).logits, adapted, atol=1e-5, rtol=0)


def _closed_form(model, preset: str, rank: int) -> int:
    """r (d_in + d_out) per adapted matrix, counting the fused c_attn as its q/k/v matrices."""
    per_matrix = {"qv": 2, "attn": 3}
    total = 0
    for name, module in model.named_modules():
        if name.endswith("attn.c_attn"):
            d_in, d_out = module.weight.shape
            total += per_matrix.get(preset, 3) * rank * (d_in + d_out // 3)
        elif isinstance(module, (nn.Linear, Conv1D)):
            d_in, d_out = (module.weight.shape if isinstance(module, Conv1D)
                           else module.weight.shape[::-1])
            leaf = name.split(".")[-1]
            wanted = {"qv": {"q_proj", "v_proj", "query", "value"},
                      "attn": {"q_proj", "k_proj", "v_proj", "query", "key", "value"}}
            extra_ffn = {"gate_proj", "up_proj", "down_proj", "c_fc", "intermediate"}
            if preset in wanted and leaf in wanted[preset]:
                total += rank * (d_in + d_out)
            elif preset == "attn-proj-ffn" and (
                    leaf in wanted["attn"] | extra_ffn | {"o_proj"}
                    or name.endswith(("attn.c_proj", "mlp.c_proj", "output.dense",
                                      "intermediate.dense"))):
                total += rank * (d_in + d_out)
    return total


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, tiny_bert])
@pytest.mark.parametrize("preset", ["qv", "attn", "attn-proj-ffn"])
def test_trainable_parameters_equal_closed_form(make, preset):
    model = make()
    expected = _closed_form(model, preset, rank=3)
    apply_lora(model, LoRAConfig(rank=3, targets=preset))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected == sum(p.numel() for p in lora_parameters(model))


def test_train_head_unties_and_trains_only_the_head():
    model = tiny_llama()
    apply_lora(model, LoRAConfig(rank=2, targets="qv", train_head=True))
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is not emb.weight and head.weight.requires_grad
    assert not emb.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n} | {"lm_head.weight"}


def test_rslora_scale():
    assert LoRAConfig(rank=16, alpha=32, rslora=True).scale == pytest.approx(8.0)
    assert LoRAConfig(rank=16, alpha=32).scale == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs,needle", [
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"alpha": 0}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_config_is_a_user_error(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        LoRAConfig(**kwargs)


def test_unknown_target_lists_adaptable_modules():
    with pytest.raises(UserError) as info:
        apply_lora(tiny_llama(), LoRAConfig(targets=("qproj",)))
    message = str(info.value)
    assert "qproj" in message and "model.layers.*.self_attn.q_proj" in message
    assert "\n" not in message


def test_non_dense_target_is_rejected():
    with pytest.raises(UserError, match="Embedding"):
        apply_lora(tiny_llama(), LoRAConfig(targets=("embed_tokens",)))


def test_glob_targets():
    model = apply_lora(tiny_llama(), LoRAConfig(targets=("model.layers.1.*.down_proj", "q_proj")))
    names = [n for n, _ in lora_modules(model)]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.mlp.down_proj"]
