"""A memory-lean gated-SiLU (SwiGLU) MLP for when its three projections are frozen.

LLaMA-family decoders (LLaMA, Mistral, Qwen2, SmolLM) compute, per token row x,

    g = x Wg^T,   u = x Wu^T,   h = silu(g) * u,   y = h Wd^T.

Run as plain PyTorch ops with frozen weights, autograd stores g (for silu), and silu(g) and u
(for the product): 3 f floats per token, f the MLP width. (The frozen matmuls keep only a
reference to their weight.) That is 18 MB per SmolLM2 layer at 8 x 128 tokens, over half of
the activations a LoRA `qv` step stores.

With frozen weights the backward pass needs only g and u:

    dh = dy Wd,   du = dh * silu(g),   dg = dh * u * silu'(g),   dx = dg Wg + du Wu,
    silu'(g) = s (1 + g (1 - s)),  s = sigmoid(g)   (aten's fused `silu_backward`),

so `_FrozenSwiGLU` saves g and u (2 f floats per token, a third less) and recomputes silu(g),
one cheap elementwise pass. The operations are the plain module's, so outputs match it exactly
and input gradients up to float summation order.

`lean_mlps(model)` swaps each such MLP for a `LeanSwiGLU` that keeps the same child modules
(`gate_proj`, `up_proj`, `down_proj`, so state-dict keys, target names and adapters are
unchanged) and decides per call: the lean path only when all three weights are plain frozen
tensors, gradients are on and torch.compile is not tracing (inductor makes its own choice of
what to save); otherwise the plain composition. Unfreezing a projection later (full
fine-tuning, a LoRA adapter on it) therefore falls back by itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's dtype when autocast is on, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FrozenSwiGLU(torch.autograd.Function):
    """y = (silu(x Wg^T) * (x Wu^T)) Wd^T with Wg, Wu, Wd frozen; saves g and u only."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            g = F.linear(xc, w_gate.to(dtype))                     # (..., f)
            u = F.linear(xc, w_up.to(dtype))                       # (..., f)
            h = F.silu(g).mul_(u)
            y = F.linear(h, w_down.to(dtype))                      # (..., d)
        ctx.save_for_backward(g, u, w_gate, w_up, w_down)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        g, u, w_gate, w_up, w_down = ctx.saved_tensors
        dtype = g.dtype
        with torch.autocast(grad_y.device.type, enabled=False):
            dh = grad_y.to(dtype) @ w_down.to(dtype)               # (..., f)
            du = F.silu(g).mul_(dh)                                # dh * silu(g)
            dg = torch.ops.aten.silu_backward(dh.mul_(u), g)       # dh * u * silu'(g)
            dx = dg @ w_gate.to(dtype)
            dx += du @ w_up.to(dtype)
        return dx.to(ctx.x_dtype), None, None, None


def _plain_frozen(linear: nn.Module) -> bool:
    """A bias-free nn.Linear (not a subclass such as a QAT or quantized layer) whose weight is
    a plain tensor that does not require grad."""
    return (type(linear) is nn.Linear and linear.bias is None
            and type(linear.weight) in (torch.Tensor, nn.Parameter)
            and not linear.weight.requires_grad)


class LeanSwiGLU(nn.Module):
    """Drop-in for a LLaMA-style MLP: the same three child projections, the same maths."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def lean(self) -> bool:
        """True when this call can take the lean path (see the module docstring)."""
        return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and all(_plain_frozen(m) for m in (self.gate_proj, self.up_proj, self.down_proj)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean():
            return _FrozenSwiGLU.apply(x, self.gate_proj.weight, self.up_proj.weight,
                                       self.down_proj.weight)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _is_swiglu(module: nn.Module) -> bool:
    """A LLaMA-style MLP: gate/up/down projections and a SiLU activation (`nn.SiLU` or
    transformers' `SiLUActivation`), whose forward is down(act(gate(x)) * up(x))."""
    act = getattr(module, "act_fn", None)
    return (all(isinstance(getattr(module, n, None), nn.Module)
                for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation")
            and not isinstance(module, LeanSwiGLU))


def lean_mlps(model: nn.Module) -> int:
    """Replace every LLaMA-style SwiGLU MLP of `model` by a `LeanSwiGLU` holding the same
    projections (in place). Returns how many were replaced; other models are left as they are."""
    found = [(name, m) for name, m in model.named_modules() if _is_swiglu(m)]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LeanSwiGLU(module.gate_proj, module.up_proj, module.down_proj))
    return len(found)
