"""Chunked fused cross-entropy against F.cross_entropy on materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loralab.kernels.losses import _chunk_mask, fused_linear_cross_entropy, shifted_labels
from loralab.lora.layer import LoRALinear


def _setup(train_head: bool, lora: bool, bias: bool, dtype=torch.float64):
    torch.manual_seed(0)
    n, d, vocab = 37, 16, 50
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    head = nn.Linear(d, vocab, bias=bias).to(dtype)
    head.requires_grad_(train_head)
    if lora:
        head = LoRALinear(head, rank=3, scale=2.0)
        nn.init.normal_(head.lora_B)
    labels = torch.randint(0, vocab, (n,))
    labels[::5] = -100
    return hidden, head, labels


def _grads(hidden, head):
    params = [p for p in head.parameters() if p.requires_grad]
    return [hidden.grad] + [p.grad for p in params]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("train_head,lora,bias", [
    (False, False, False), (True, False, True), (False, True, False), (False, True, True)])
@pytest.mark.parametrize("chunk", [8, 1024])
def test_matches_full_logits(train_head, lora, bias, smoothing, chunk):
    hidden, head, labels = _setup(train_head, lora, bias)
    total, count = fused_linear_cross_entropy(hidden, head, labels, smoothing, chunk)
    total.mul(0.7).backward()
    got = _grads(hidden, head)
    for t in got:
        t.detach_()
    hidden.grad = None
    for p in head.parameters():
        p.grad = None
    ref = F.cross_entropy(head(hidden), labels, reduction="sum", label_smoothing=smoothing)
    ref.mul(0.7).backward()
    assert count == int((labels != -100).sum())
    torch.testing.assert_close(total, ref.to(total.dtype))
    for g, r in zip(got, _grads(hidden, head), strict=True):
        torch.testing.assert_close(g, r)


def test_lora_head_dropout_matches_reference():
    hidden, head, labels = _setup(False, True, False)
    head.dropout = 0.3
    head.train()
    torch.manual_seed(11)
    total, _ = fused_linear_cross_entropy(hidden, head, labels, chunk_size=8)
    total.backward()
    got = _grads(hidden, head)
    for t in got:
        t.detach_()
    hidden.grad = None
    head.lora_A.grad = head.lora_B.grad = None
    from loralab.lora.dropout import draw_seed

    torch.manual_seed(11)
    seed = draw_seed()
    keep = labels != -100
    h = hidden[keep]
    mask = torch.cat([_chunk_mask(h, 0.3, seed, s, 8, h.dtype) for s in range(0, len(h), 8)])
    logits = F.linear(h, head.base.weight) + 2.0 * ((h * mask) @ head.lora_A.T) @ head.lora_B.T
    F.cross_entropy(logits, labels[keep], reduction="sum").backward()
    for g, r in zip(got, _grads(hidden, head), strict=True):
        torch.testing.assert_close(g, r)


def test_bf16_autocast_close_to_fp32():
    hidden, head, labels = _setup(False, True, False, dtype=torch.float32)
    ref, _ = fused_linear_cross_entropy(hidden, head, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = fused_linear_cross_entropy(hidden, head, labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=0.5)


def test_shifted_labels():
    labels = torch.tensor([[1, 2, 3, -100]])
    assert shifted_labels(labels).tolist() == [[2, 3, -100, -100]]


def test_matches_transformers_causal_lm_loss():
    """The loss of a causal LM computed from hidden states equals the model's own loss."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 20))
    labels = ids.clone()
    labels[0, :5] = -100
    expected = model(ids, labels=labels).loss
    hidden = model.model(ids).last_hidden_state
    total, count = fused_linear_cross_entropy(hidden, model.lm_head, shifted_labels(labels))
    torch.testing.assert_close(total / count, expected)


def test_causal_lm_loss_module_matches_model_loss_and_grads():
    """CausalLMLoss on a LoRA GPT-2 and LLaMA: same loss and adapter gradients as the model's
    own `labels=` loss."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_gpt2, tiny_llama
    from loralab.kernels.losses import CausalLMLoss, fused_loss_supported
    from loralab.lora.config import LoRAConfig
    from loralab.lora.inject import apply_lora, lora_modules, lora_parameters

    for make in (tiny_gpt2, tiny_llama):
        model = apply_lora(make(), LoRAConfig(rank=2, targets="all"))
        for _, layer in lora_modules(model):
            nn.init.normal_(layer.lora_B, std=0.1)
        assert fused_loss_supported(model)
        ids = torch.randint(0, 128, (2, 16))
        mask = torch.ones_like(ids)
        expected = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        expected.backward()
        ref = [p.grad.clone() for p in lora_parameters(model)]
        model.zero_grad()
        total = CausalLMLoss(model)(ids, mask, ids)
        (total / (2 * 15)).backward()
        torch.testing.assert_close(total / (2 * 15), expected)
        for p, r in zip(lora_parameters(model), ref, strict=True):
            torch.testing.assert_close(p.grad, r, atol=1e-6, rtol=1e-4)


def test_fused_loss_not_claimed_for_unknown_models():
    from loralab.kernels.losses import fused_loss_supported

    assert not fused_loss_supported(nn.Linear(2, 2))
