"""Dropout with cheap, seeded masks: the masks LoRA's branch, the model's own dropout layers and
attention dropout (`loralab.kernels.attention`) use in training.

Dropout multiplies by a keep-mask m / P(keep), m_i ~ Bernoulli(1 - p). PyTorch's CPU
`bernoulli_` draws one Mersenne-Twister number per element (~11 ns each here: 0.34 s of a
GPT-2 4 x 256 step for attention dropout alone), and `x * mask` with a boolean mask first casts
the mask to x's dtype (an extra pass and allocation). Here:

- the random bits come from 64-bit random words, four 16-bit uniforms u per word
  (`random_bits`), ~4x fewer generator calls;
- an element is kept when u >= round(p 2^16), so P(drop) is p rounded to a multiple of 2^-16
  (0.1 -> 0.100006) and the rescale 1 / P(keep) uses that exact probability: E[m / P(keep)] = 1;
- the mask is formed directly in the compute dtype (`keep_float`: one comparison written into a
  float tensor), so applying it is a plain float product;
- what autograd keeps is the 16-bit uniforms (2 bytes an element; the mask is re-formed from
  them in backward by one comparison), not a float mask (4 bytes) or a dropped copy of x.

Seeds come from torch's global generator (`draw_seed`), so `torch.manual_seed` fixes every mask
exactly as it fixes `nn.Dropout`'s, though the masks themselves differ from `nn.Dropout`'s.
"""

from __future__ import annotations

import torch
from torch import nn


def random_bits(shape: torch.Size, seed: int, device: torch.device) -> torch.Tensor:
    """An int16 tensor of `shape` whose elements are independent uniforms on [-2^15, 2^15),
    drawn as 64-bit words (four elements per word) from a generator seeded with `seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-2**63, 2**63 - 1, generator=generator)  # 64 uniform bits per word
    return words.view(torch.int16)[:n].view(shape)


def drop_threshold(p: float) -> tuple[int, float]:
    """(t, 1 / P(keep)) for dropout probability p: u + 2^15 < t drops, P(drop) = t / 2^16."""
    threshold = round(p * 65536)
    return threshold, 65536 / (65536 - threshold)


def keep_float(bits: torch.Tensor, p: float, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(m, 1 / P(keep)): the keep-mask of `random_bits` as 0 / 1 in `dtype`, in one pass."""
    threshold, rescale = drop_threshold(p)
    keep = torch.empty(bits.shape, dtype=dtype, device=bits.device)
    torch.ge(bits, threshold - 32768, out=keep)
    return keep, rescale


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """The mask drawn from `seed` in the form keep / P(keep), as a `dtype` tensor."""
    keep, rescale = keep_float(random_bits(shape, seed, device), p, dtype)
    return keep.mul_(rescale)


def draw_seed() -> int:
    """A dropout seed from torch's global RNG: fixed by torch.manual_seed, like nn.Dropout."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


class _SeededDropout(torch.autograd.Function):
    """y = x * m / P(keep); dx = dy * m / P(keep). Saves the 16-bit uniforms only."""

    @staticmethod
    def forward(ctx, x, p: float, seed: int):
        bits = random_bits(x.shape, seed, x.device)
        keep, rescale = keep_float(bits, p, x.dtype)
        ctx.save_for_backward(bits)
        ctx.p = p
        return keep.mul_(x).mul_(rescale)

    @staticmethod
    def backward(ctx, grad_out):
        (bits,) = ctx.saved_tensors
        keep, rescale = keep_float(bits, ctx.p, grad_out.dtype)
        return keep.mul_(grad_out).mul_(rescale), None, None


def seeded_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Functional form: dropout of x with the mask drawn from `seed`."""
    return _SeededDropout.apply(x, p, seed)


class SeededDropout(nn.Module):
    """A drop-in for `nn.Dropout` (same `p`, same train / eval behaviour) with the cheap mask.

    Under torch.compile it is plain `F.dropout`, so inductor generates and fuses its own mask.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if torch.compiler.is_compiling():
            return nn.functional.dropout(x, self.p, training=True)
        return seeded_dropout(x, self.p, draw_seed())


def seeded_dropouts(model: nn.Module) -> int:
    """Replace every `nn.Dropout` in `model` (exact type, p > 0) by a `SeededDropout` with the
    same p, in place. Returns how many were replaced. Dropout layers have no parameters or
    buffers, so state dicts, adapters and saved models are unchanged."""
    swaps = [(parent, name, child.p) for parent in model.modules()
             for name, child in parent.named_children()
             if type(child) is nn.Dropout and child.p > 0 and not child.inplace]
    for parent, name, p in swaps:
        seeded = SeededDropout(p)
        seeded.train(getattr(parent, name).training)
        setattr(parent, name, seeded)
    return len(swaps)
