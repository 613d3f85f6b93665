"""The LoRA layer against a naive autograd reference, and its memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loralab.lora.dropout import draw_seed, dropout_mask
from loralab.lora.layer import LoRALinear, lora_matmul
from loralab.models.heads import CarriesAdapters


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


def test_layer_names_its_adapter_parameters():
    """LoRALinear implements the models layer's CarriesAdapters protocol with (A, B)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 4), rank=2, scale=1.0)
    assert isinstance(layer, CarriesAdapters)
    assert layer.adapter_parameters() == (layer.lora_A, layer.lora_B)


def test_a_rank_larger_than_both_sides_of_the_layer_is_refused():
    """B A has rank <= min(d_in, d_out); a rank above max(d_in, d_out) only grows A and B past
    the layer (a fresh user's --rank 100000 on SmolLM2 ran out of memory instead of an error).
    Up to max(d_in, d_out) stays allowed, as PEFT allows it (e.g. rank 8 on a 2-class head)."""
    from loralab.errors import UserError

    with pytest.raises(UserError, match=r"LoRA rank 65 is larger than both sides of a 64 x 16 "
                                        r"Linear .*at most 16.*choose rank <= 64"):
        LoRALinear(nn.Linear(64, 16), rank=65, scale=1.0)
    assert LoRALinear(nn.Linear(64, 2), rank=8, scale=1.0).lora_B.shape == (2, 8)
    assert LoRALinear(nn.Linear(64, 16), rank=64, scale=1.0).lora_A.shape == (64, 64)
