"""Attention with seeded dropout: against a naive reference and transformers' own SDPA path."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from loralab.kernels import attention
from loralab.kernels.attention import NAME, attention_with_dropout, use_dropout_attention
from loralab.lora.dropout import dropout_mask


def naive(q, k, v, mask, causal, scaling, p, seed):
    """softmax(c q k^T + mask) * m / P(keep) @ v with plain autograd ops."""
    scores = q @ k.transpose(-1, -2) * scaling
    if causal:
        above = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    elif mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    return (probs * dropout_mask(probs.shape, p, seed, q.device, q.dtype)) @ v


@pytest.mark.parametrize("kind", ["causal", "bool", "additive"])
def test_matches_naive_reference(kind):
    """Output and q, k, v gradients equal the naive composition with the same mask."""
    torch.manual_seed(0)
    b, h, t, d = 2, 3, 7, 5
    q, k, v = (torch.randn(b, h, t, d, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    mask = None
    if kind == "bool":                           # padding: the last 2 keys of item 1 masked
        mask = torch.ones(b, 1, t, t, dtype=torch.bool)
        mask[1, :, :, -2:] = False
    elif kind == "additive":
        mask = torch.randn(b, 1, t, t, dtype=torch.float64)
    dy = torch.randn(b, h, t, d, dtype=torch.float64)
    out = attention_with_dropout(q, k, v, mask, kind == "causal", 0.4, 0.3, seed=9)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    ref = naive(q, k, v, mask, kind == "causal", 0.4, 0.3, seed=9)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dy)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=False):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    # dropout really drops: the same call without it differs
    assert not torch.allclose(out, naive(q, k, v, mask, kind == "causal", 0.4, 0.0, 9))


def test_gradcheck():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention_with_dropout(a, b, c, None, True, 0.5, 0.25, 4), (q, k, v))


def _gpt2(attn_pdrop=0.1):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                      n_positions=32, attn_pdrop=attn_pdrop, resid_pdrop=0.0,
                                      embd_pdrop=0.0))


def test_gpt2_switch_keeps_eval_outputs_and_trains():
    """Switching keeps evaluation bit-identical (those calls go to transformers' SDPA), a
    training step with attention dropout runs through it, and the name is not saved."""
    model = _gpt2().eval()
    ids = torch.randint(0, 64, (2, 12))
    before = model(ids).logits
    assert use_dropout_attention(model)
    assert model.config._attn_implementation == NAME
    assert NAME not in model.config.to_json_string()
    assert torch.equal(model(ids).logits, before)
    model.train()
    torch.manual_seed(5)
    first = model(ids, labels=ids).loss
    first.backward()
    assert torch.isfinite(first)
    assert all(p.grad is not None for p in model.parameters())
    torch.manual_seed(5)
    assert torch.equal(model(ids, labels=ids).loss, first)      # seeded by torch.manual_seed
    assert not torch.equal(model(ids, labels=ids).loss, first)  # and a fresh mask per step


def _matches_naive(model, ids, seed, monkeypatch) -> list[tuple]:
    """Run a training forward and backward of `model` twice from `seed`: through loralab's
    attention and through `naive` (same seeds, so the same masks); assert the losses and all
    parameter gradients agree and return the arguments of each naive call."""
    torch.manual_seed(seed)
    loss = model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    calls = []
    monkeypatch.setattr(attention, "attention_with_dropout",
                        lambda *args: calls.append(args) or naive(*args))
    torch.manual_seed(seed)
    ref = model(ids, labels=ids).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    # the loss (~4.2, log space) differed by 1 fp32 ulp (4.8e-7) between the fused and the naive
    # attention here: 1e-6 relative left ~9 ulps, too few for another CPU's kernels; 1e-5 is
    # ~90 ulps and still far below a wrong mask or scale (~1e-2)
    assert torch.allclose(loss, ref, rtol=1e-5)
    # gradients (|g| <= 0.23): measured <= 3.2e-8 apart, >30x inside these
    for got, want in zip(grads, ref_grads, strict=False):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    return calls


def test_gpt2_training_matches_the_naive_attention_with_the_same_masks(monkeypatch):
    """A whole GPT-2 training forward and backward through the switched model equals the
    same model run with the naive reference attention drawing the same seeds."""
    model = _gpt2()
    use_dropout_attention(model)
    model.train()
    ids = torch.randint(0, 64, (2, 12))
    calls = _matches_naive(model, ids, 7, monkeypatch)
    assert len(calls) == 2                                      # one per layer


def test_bert_with_padding_uses_it_and_llama_without_dropout_does_not(monkeypatch):

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=2))
    ids = torch.randint(0, 64, (2, 9))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -3:] = 0
    bert.eval()
    before = bert(input_ids=ids, attention_mask=attention_mask).logits
    assert use_dropout_attention(bert)
    # the padding mask is still built and applied: evaluation is unchanged bit for bit
    assert torch.equal(bert(input_ids=ids, attention_mask=attention_mask).logits, before)
    bert.train()
    calls = []
    monkeypatch.setattr(attention, "attention_with_dropout",
                        lambda *args: calls.append(args[3]) or naive(*args))
    out = bert(input_ids=ids, attention_mask=attention_mask, labels=torch.tensor([0, 1]))
    assert len(calls) == 2 and calls[0] is not None             # padding mask passed on
    out.loss.backward()
    assert torch.isfinite(out.loss)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2))
    assert not use_dropout_attention(llama)                     # attention_dropout = 0
    assert not use_dropout_attention(_gpt2(attn_pdrop=0.0))


def test_bf16_autocast_runs_in_bf16():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_with_dropout(q, k, v, None, True, 0.5, 0.1, 3)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


def test_llama_with_attention_dropout_and_grouped_kv_matches_the_naive_attention(monkeypatch):
    """A LLaMA-style model with grouped key/value heads and attention_dropout > 0 goes through
    it (keys and values repeated per group), and a training forward and backward equals the
    same model running the naive reference with the same seeds."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, attention_dropout=0.2))
    assert use_dropout_attention(llama)
    llama.train()
    ids = torch.randint(0, 64, (2, 10))
    calls = _matches_naive(llama, ids, 4, monkeypatch)
    assert [args[1].shape for args in calls] == [torch.Size((2, 4, 10, 8))] * 2  # k: 4 heads
