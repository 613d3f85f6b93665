"""Cross-entropy over a large vocabulary without materialising the logits.

A causal LM's loss is  L = sum_t CE(h_t W^T + b, y_t)  over the N scored tokens, with W the
V x d output head. Computed the usual way, the N x V logits (fp32: 1024 tokens x 49,152 = 200 MB
for SmolLM2 at batch 8 x 128) are stored for backward, and the softmax, log-softmax and their
gradients each make another copy: about 0.6 GB, the largest single item in a LoRA step.

Because the loss is the end of the graph, its gradient can be formed in the forward pass, one
chunk of tokens at a time (as Liger-Kernel's fused linear cross-entropy does):

    z = h W^T + b                         (chunk x V, transient)
    p = softmax(z);  q = (1 - eps) onehot(y) + eps / V      (label smoothing eps)
    loss = sum_t [ logsumexp(z_t) - <q_t, z_t> ]
    dL/dz = p - q  ->  dL/dh = (p - q) W,  dL/dW = (p - q)^T h,  dL/db = sum_t (p - q)

Only dL/dh (N x d) and the head's gradients are kept; backward scales them by the incoming
gradient. A LoRA-adapted head (W + s B A) is handled in the same pass:
dL/dh += s ((p - q) B) A,  dL/dA = s ((p - q) B)^T h,  dL/dB = s (p - q)^T (h A^T).

The result is exact (same loss and gradients as `F.cross_entropy` on full logits, up to float
summation order) and returns the *sum* of token losses and the token count, so gradient
accumulation can weight micro-batches by tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from loralab.lora.dropout import draw_seed, dropout_mask
from loralab.lora.layer import LoRALinear, compute_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel

IGNORE_INDEX = -100


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, labels: torch.Tensor,
                scale: float, label_smoothing: float, chunk_size: int, p: float, seed: int,
                grads: bool) -> torch.Tensor:
        n, d = hidden.shape
        vocab = weight.shape[0]
        dtype = compute_dtype(hidden)
        # (A, B) of a LoRA head: given together or not at all
        lora = None if lora_a is None or lora_b is None else (lora_a, lora_b)
        need_w = grads and weight.requires_grad
        need_b = grads and bias is not None and bias.requires_grad
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            ab = None if lora is None else (lora[0].to(dtype), lora[1].to(dtype))
            grad_h = torch.empty(n, d, dtype=hidden.dtype, device=hidden.device) \
                if grads and hidden.requires_grad else None
            acc = torch.promote_types(dtype, torch.float32)  # accumulate in >= fp32
            grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
            grad_b = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_b else None
            grad_ab = (torch.zeros_like(lora[0], dtype=acc), torch.zeros_like(lora[1], dtype=acc)) \
                if grads and lora is not None and lora[0].requires_grad else None
            total = torch.zeros((), dtype=acc, device=hidden.device)
            for start in range(0, n, chunk_size):
                h = hidden[start:start + chunk_size].to(dtype)
                y = labels[start:start + chunk_size]
                z = F.linear(h, w, b)                                   # (c, V)
                hu = None                                               # (dropped-out h, h A^T)
                if ab is not None:
                    a, bb = ab
                    hd = h if p == 0 else h * _chunk_mask(hidden, p, seed, start, chunk_size, dtype)
                    u = hd @ a.T                                        # (c, r)
                    z.addmm_(u, bb.T, alpha=scale)
                    hu = hd, u
                z = z.to(torch.promote_types(z.dtype, torch.float32))   # softmax in >= fp32
                valid = y != IGNORE_INDEX
                safe_y = torch.where(valid, y, torch.zeros_like(y))
                target = z.gather(1, safe_y[:, None]).squeeze(1)
                z_mean = z.mean(dim=-1) if label_smoothing > 0 else None
                # logsumexp by hand, in place, so exp(z - max) is computed once and reused as
                # the softmax numerator (no second (c, V) buffer, one exp pass instead of two)
                z_max = z.amax(dim=-1)                                  # (c,)
                e = z.sub_(z_max[:, None]).exp_()                       # exp(z - max), in z
                denom = e.sum(dim=-1)
                lse = z_max + denom.log()
                loss_t = lse - target
                if z_mean is not None:                                  # label_smoothing > 0
                    loss_t = (1 - label_smoothing) * loss_t + label_smoothing * (lse - z_mean)
                total += (loss_t * valid).sum()
                if not grads:
                    continue
                # dL/dz = softmax(z) - q, zero on ignored rows; computed in place
                g = e.div_(denom[:, None])
                g.scatter_add_(1, safe_y[:, None],
                               torch.full_like(target[:, None], -(1 - label_smoothing)))
                if label_smoothing > 0:
                    g.sub_(label_smoothing / vocab)
                if not bool(valid.all()):
                    g.mul_(valid[:, None])
                gc = g.to(dtype)
                if grad_h is not None:
                    gh = gc @ w                                         # (c, d)
                    if ab is not None:
                        a, bb = ab
                        if p == 0:
                            gh.addmm_(gc @ bb, a, alpha=scale)
                        else:                                           # through the dropout
                            mask = _chunk_mask(hidden, p, seed, start, chunk_size, dtype)
                            gh.add_((gc @ bb @ a).mul_(mask), alpha=scale)
                    grad_h[start:start + chunk_size] = gh
                if grad_w is not None:
                    grad_w.addmm_(gc.T.to(acc), h.to(acc))
                if grad_b is not None:
                    grad_b += g.sum(0).to(acc)
                if grad_ab is not None and ab is not None and hu is not None:
                    (grad_a, grad_bb), (a, bb), (hd, u) = grad_ab, ab, hu
                    gbb = gc @ bb                                       # (c, r)
                    grad_a.addmm_(gbb.T.to(acc), hd.to(acc), alpha=scale)
                    grad_bb.addmm_(gc.T.to(acc), u.to(acc), alpha=scale)
        ctx.save_for_backward(grad_h, grad_w, grad_b, *(grad_ab or (None, None)))
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype,
                      None if lora_a is None else lora_a.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b, grad_a, grad_bb = ctx.saved_tensors
        w_dtype, b_dtype, lora_dtype = ctx.dtypes

        def scaled(t, dtype):
            return None if t is None else (t * grad_total).to(dtype or t.dtype)

        return (scaled(grad_h, None), scaled(grad_w, w_dtype), scaled(grad_b, b_dtype),
                scaled(grad_a, lora_dtype), scaled(grad_bb, lora_dtype),
                None, None, None, None, None, None, None)


def _chunk_mask(hidden: torch.Tensor, p: float, seed: int, start: int, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Rows start..start+chunk of the LoRA-branch dropout mask over all of `hidden`'s tokens
    (one mask, drawn from `seed`, so it does not depend on the chunk size)."""
    rows = min(chunk, hidden.shape[0] - start)
    generator_seed = seed + start  # a distinct, reproducible stream per chunk
    return dropout_mask(torch.Size((rows, hidden.shape[1])), p, generator_seed, hidden.device,
                        dtype)


def fused_linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                               label_smoothing: float = 0.0,
                               chunk_size: int = 256) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies, number of scored tokens) of `head(hidden)` against
    `labels` (already aligned: labels[t] is the target for hidden[t]; -100 = no loss), never
    holding more than `chunk_size` x V logits. `head` is an `nn.Linear` or a LoRA-adapted one."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    count = int(keep.sum())
    if count < labels.numel():  # score only the tokens with a label: no work on padding
        hidden, labels = hidden[keep], labels[keep]
    p, seed = 0.0, 0
    if isinstance(head, LoRALinear) and not head.merged:
        if head.conv1d or len(head.slices) != 1:
            raise ValueError("fused cross-entropy needs an unsliced Linear LoRA head")
        base, a, b, scale = head.base, head.lora_A, head.lora_B, head.scale
        if head.training and head.dropout > 0:
            p, seed = head.dropout, draw_seed()
    else:
        base, a, b, scale = (head.base if isinstance(head, LoRALinear) else head), None, None, 0.0
    if not isinstance(base, nn.Linear):
        raise ValueError(f"fused cross-entropy needs a Linear head, got {type(base).__name__}")
    grads = torch.is_grad_enabled()  # under no_grad (evaluation) only the loss is computed
    total = _FusedLinearCE.apply(hidden, base.weight, base.bias, a, b, labels, scale,
                                 label_smoothing, chunk_size, p, seed, grads)
    return total, count


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the positions that predict them: out[:, t] = labels[:,
    t + 1], and the last position gets no target (-100)."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


# Decoder families whose logits are exactly lm_head(final hidden state): no logit soft-capping
# or scaling, so the fused loss equals the model's own.
_FUSED_FAMILIES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "smollm3"}


def fused_loss_supported(model: nn.Module) -> bool:
    """True when `CausalLMLoss` computes exactly the model's own next-token loss."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _FUSED_FAMILIES:
        return False
    if getattr(config, "final_logit_softcapping", None):
        return False
    head = (cast("PreTrainedModel", model).get_output_embeddings()
            if hasattr(model, "get_output_embeddings") else None)
    if isinstance(head, LoRALinear):
        return not head.conv1d and len(head.slices) == 1 and isinstance(head.base, nn.Linear)
    return isinstance(head, nn.Linear) and getattr(model, "base_model", model) is not model


class CausalLMLoss(nn.Module):
    """The summed next-token cross-entropy of a causal LM, computed from the decoder's final
    hidden states with `fused_linear_cross_entropy` (no full logits).

    A module (not a function) so DistributedDataParallel can wrap it: its forward runs the
    decoder (`model.base_model`) and the head's parameters inside one DDP forward.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0,
                 chunk_size: int = 256) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                labels: torch.Tensor) -> torch.Tensor:
        model = cast("PreTrainedModel", self.model)  # a model `fused_loss_supported` accepted
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=False)
        hidden = out.last_hidden_state                                  # (B, T, d)
        total, _ = fused_linear_cross_entropy(hidden, model.get_output_embeddings(),
                                              shifted_labels(labels), self.label_smoothing,
                                              self.chunk_size)
        return total
