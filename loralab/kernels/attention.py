"""Attention with dropout for training: transformers' SDPA attention with a seeded mask.

Models such as GPT-2 (attn_pdrop = 0.1) and BERT apply dropout to the attention probabilities
in training. PyTorch's fused SDPA kernels on the CPU do not support dropout, so
`F.scaled_dot_product_attention(..., dropout_p=p)` falls back to its math path:

    S = (q sqrt(c)) (k sqrt(c))^T + mask,   P = softmax(S),   P~ = P * m / P(keep),   O = P~ v

with m from `bernoulli_` (one Mersenne-Twister draw per element: 0.34 s of a GPT-2 4 x 256
step) and a boolean m cast to float for the product, and autograd keeps P, m and P~ (9 bytes per
attention weight, 540 MB at GPT-2 4 x 256).

`_DropoutAttention` computes the same map with the cheap seeded mask of `loralab.lora.dropout`, and
keeps q, k, v, P and the mask's 16-bit uniforms (6 bytes per weight). Backward, with
m~ = m / P(keep) re-formed from the uniforms:

    P~ = P m~,   dv = P~^T dO,   dP = (dO v^T) m~,
    dS = P (dP - rowsum(dP P))   (aten's fused softmax backward),
    dq = c dS k,   dk = c dS^T q.

`dropout_attention` is an attention function in transformers' `AttentionInterface` form: it
runs `_DropoutAttention` when the call asks for dropout and hands every other call (evaluation,
p = 0, caches, position biases, soft-capping) to transformers' own SDPA function unchanged, so
outputs without dropout are those of the "sdpa" implementation bit for bit.
`use_dropout_attention(model)` registers it under the name "loralab_sdpa", with SDPA's mask
function (so padding and causal masks are built exactly as for "sdpa"), and switches a model
whose attention is "sdpa" and has dropout to it. The name is not saved with the config
(transformers drops `_attn_implementation` from saved configs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from loralab.lora.dropout import draw_seed, keep_float, random_bits
from loralab.lora.layer import compute_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NAME = "loralab_sdpa"


class _DropoutAttention(torch.autograd.Function):
    """O = (softmax(c q k^T + mask) * m / P(keep)) v for (batch, heads, tokens, head_dim)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal: bool, scaling: float, p: float, seed: int):
        dtype = compute_dtype(q)                   # autocast's dtype, as SDPA would run in
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scaling)  # (B, H, T, Tk)
            if causal:                                               # query i sees keys <= i
                above = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
                scores.masked_fill_(above.triu_(1), float("-inf"))
            elif mask is not None and mask.dtype == torch.bool:      # True = attend
                scores.masked_fill_(~mask, torch.finfo(dtype).min)
            elif mask is not None:                                   # additive
                scores.add_(mask.to(dtype))
            probs = torch.softmax(scores, dim=-1)
            del scores
            bits = random_bits(probs.shape, seed, q.device)
            keep, rescale = keep_float(bits, p, dtype)
            dropped = keep.mul_(probs)                               # P m (1 / P(keep) below)
            out = torch.matmul(dropped, v).mul_(rescale)
        ctx.save_for_backward(q, k, v, probs, bits)
        ctx.meta = (scaling, p)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, bits = ctx.saved_tensors
        scaling, p = ctx.meta
        needs = ctx.needs_input_grad
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(q.dtype)
            keep, rescale = keep_float(bits, p, q.dtype)
            keep.mul_(rescale)                                       # m~ = m / P(keep)
            grad_v = torch.matmul((probs * keep).transpose(-1, -2), grad_out)
            grad_probs = torch.matmul(grad_out, v.transpose(-1, -2)).mul_(keep)
            del keep
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, q.dtype)
            del grad_probs
            grad_q = torch.matmul(grad_scores, k).mul_(scaling) if needs[0] else None
            grad_k = (torch.matmul(grad_scores.transpose(-1, -2), q).mul_(scaling)
                      if needs[1] else None)
        return grad_q, grad_k, grad_v if needs[2] else None, None, None, None, None, None


def attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None, causal: bool, scaling: float, p: float,
                           seed: int) -> torch.Tensor:
    """Functional form of `_DropoutAttention`; returns (batch, heads, tokens, head_dim)."""
    return _DropoutAttention.apply(q, k, v, mask, causal, scaling, p, seed)


def dropout_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns ((B, T, H, D) output, None)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    plain = (dropout == 0 or torch.compiler.is_compiling()
             or any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "cache"))
             or key.shape[-2] != query.shape[-2])
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and attention_mask is None and query.shape[-2] > 1
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :key.shape[-2]]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attention_with_dropout(query, key, value, attention_mask, causal, scale, dropout,
                                 draw_seed())
    return out.transpose(1, 2).contiguous(), None


def use_dropout_attention(model: nn.Module) -> bool:
    """Switch `model` (a transformers model using "sdpa" with attention dropout) to
    `dropout_attention`, in place. Returns whether it was switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    rates = [getattr(config, name, 0.0) for name in
             ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")]
    if not any(isinstance(rate, float) and rate > 0 for rate in rates):
        return False
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return False
    # idempotent: the same functions each time. The mask function matters: transformers
    # builds no padding or causal mask at all for a name it has no mask function for
    AttentionInterface.register(NAME, dropout_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    cast("PreTrainedModel", model).set_attn_implementation(NAME)  # checked just above
    return config._attn_implementation == NAME
