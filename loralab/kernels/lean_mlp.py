"""Memory-lean MLPs for when their projections are frozen: LLaMA's SwiGLU and GPT-2's GELU.

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

GPT-2's MLP, y = gelu(x Wfc + bfc) Wproj + bproj with Conv1D weights stored (d_in, d_out),
gets the same treatment: its "gelu_new" is written as eight elementwise ops (a cube, three
scaled adds, tanh, two products), which store four (tokens x 4d) tensors for backward and
take as many passes each way. With frozen weights backward needs only h = x Wfc + bfc:

    da = dy Wproj^T,   dh = gelu'(h) da   (aten's fused `gelu_backward`),   dx = dh Wfc^T,

so `_FrozenGeluMLP` saves h and uses PyTorch's fused tanh-approximate GELU, the same function
as "gelu_new" (transformers' own "gelu_pytorch_tanh" is that kernel), equal up to float
rounding (~1e-7 relative) rather than bit for bit.

When the GPT-2 projections carry LoRA adapters or train (full fine-tuning), the lean function
does not apply, but a training call still uses the fused GELU: autograd then saves h for it
where "gelu_new" keeps four (tokens x 4d) tensors, and it takes one pass each way instead of
eight. Calls without gradients (evaluation, generation) run "gelu_new" itself, so they match
the transformers model bit for bit.

`lean_mlps(model)` swaps each such MLP for a `LeanSwiGLU` / `LeanGeluMLP` that keeps the
same child modules (`gate_proj`, `up_proj`, `down_proj`; `c_fc`, `c_proj`), so state-dict
keys, target names and adapters are unchanged, and decides per call: the lean path only when
all the projections are plain frozen tensors, gradients are on and torch.compile is not
tracing (inductor makes its own choice of what to save); otherwise the plain composition.
Unfreezing a projection later (full fine-tuning, a LoRA adapter on it) therefore falls back by
itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loralab.lora.layer import compute_dtype


class _FrozenSwiGLU(torch.autograd.Function):
    """y = (silu(x Wg^T) * (x Wu^T)) Wd^T with Wg, Wu, Wd frozen; saves g and u only."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        dtype = compute_dtype(x)
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


def _frozen_plain(*tensors: torch.Tensor | nn.Module | None) -> bool:
    """Every tensor is a plain tensor (not a quantized subclass) that does not require grad."""
    return all((type(t) is torch.Tensor or type(t) is nn.Parameter) and not t.requires_grad
               for t in tensors)


def _lean_call() -> bool:
    """Gradients are on and torch.compile is not tracing: the calls a lean path is for."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _plain_frozen(linear: nn.Module) -> bool:
    """A bias-free nn.Linear (not a subclass such as a QAT or quantized layer) with a plain
    frozen weight."""
    return type(linear) is nn.Linear and linear.bias is None and _frozen_plain(linear.weight)


class LeanSwiGLU(nn.Module):
    """Drop-in for a LLaMA-style MLP: the same three child projections, the same maths."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def lean(self) -> bool:
        """True when this call can take the lean path (see the module docstring)."""
        return _lean_call() and all(_plain_frozen(m)
                                    for m in (self.gate_proj, self.up_proj, self.down_proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean():
            return _FrozenSwiGLU.apply(x, self.gate_proj.weight, self.up_proj.weight,
                                       self.down_proj.weight)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _FrozenGeluMLP(torch.autograd.Function):
    """y = gelu(x Wfc + bfc) Wproj + bproj, Conv1D layout, weights and biases frozen; saves h."""

    @staticmethod
    def forward(ctx, x, w_fc, b_fc, w_proj, b_proj, approximate: str):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            h = torch.addmm(b_fc.to(dtype), x2, w_fc.to(dtype))    # (N, f)
            a = F.gelu(h, approximate=approximate)
            y = torch.addmm(b_proj.to(dtype), a, w_proj.to(dtype))  # (N, d)
        ctx.save_for_backward(h, w_fc, w_proj)
        ctx.meta = (approximate, x.dtype, x.shape)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        h, w_fc, w_proj = ctx.saved_tensors
        approximate, x_dtype, x_shape = ctx.meta
        dtype = h.dtype
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
            da = g @ w_proj.to(dtype).T                             # (N, f)
            dh = torch.ops.aten.gelu_backward(da, h, approximate=approximate)
            dx = dh @ w_fc.to(dtype).T                              # (N, d)
        return dx.view(x_shape).to(x_dtype), None, None, None, None, None


def _plain_frozen_conv1d(layer: nn.Module) -> bool:
    """A transformers Conv1D with plain frozen weight and bias tensors."""
    return (type(layer).__name__ == "Conv1D" and layer.bias is not None
            and _frozen_plain(layer.weight, layer.bias))


def _gelu_approximation(act: nn.Module | None) -> str | None:
    """'tanh' for "gelu_new" / "gelu_pytorch_tanh", None for any other activation."""
    if type(act).__name__ in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh"):
        return "tanh"
    return None


class LeanGeluMLP(nn.Module):
    """Drop-in for GPT-2's MLP: the same c_fc, c_proj, activation and residual dropout."""

    def __init__(self, c_fc: nn.Module, c_proj: nn.Module, act: nn.Module,
                 dropout: nn.Module) -> None:
        super().__init__()
        self.c_fc, self.c_proj, self.act, self.dropout = c_fc, c_proj, act, dropout
        self.approximate = _gelu_approximation(act)

    def lean(self) -> bool:
        """True when this call can take the lean path (see the module docstring)."""
        return (_lean_call() and self.approximate is not None
                and _plain_frozen_conv1d(self.c_fc) and _plain_frozen_conv1d(self.c_proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean():
            y = _FrozenGeluMLP.apply(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight,
                                     self.c_proj.bias, self.approximate)
        elif self.approximate is not None and torch.is_grad_enabled():
            # trainable or adapted projections: the fused kernel still saves h alone
            y = self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))
        else:
            y = self.c_proj(self.act(self.c_fc(x)))
        return self.dropout(y)


def _is_swiglu(module: nn.Module) -> bool:
    """A LLaMA-style MLP: gate/up/down projections and a SiLU activation (`nn.SiLU` or
    transformers' `SiLUActivation`), whose forward is down(act(gate(x)) * up(x))."""
    act = getattr(module, "act_fn", None)
    return (all(isinstance(getattr(module, n, None), nn.Module)
                for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation")
            and not isinstance(module, LeanSwiGLU))


def _lean_version(module: nn.Module) -> nn.Module | None:
    """The lean replacement for a supported MLP, else None."""
    child = module.get_submodule  # typed nn.Module access to a direct child
    if _is_swiglu(module):
        return LeanSwiGLU(child("gate_proj"), child("up_proj"), child("down_proj"))
    if (type(module).__name__ == "GPT2MLP"
            and _gelu_approximation(getattr(module, "act", None)) is not None):
        return LeanGeluMLP(child("c_fc"), child("c_proj"), child("act"), child("dropout"))
    return None


def lean_mlps(model: nn.Module) -> int:
    """Replace every LLaMA-style SwiGLU MLP and every GPT-2 tanh-GELU MLP of `model` by its lean
    version holding the same child modules (in place). Returns how many were replaced; other
    models are left as they are."""
    found = [(name, m, lean) for name, m in model.named_modules()
             if (lean := _lean_version(m)) is not None]
    for name, module, lean in found:
        _share_hooks(lean, module)
        lean.train(module.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, lean)
    return len(found)


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


def _share_hooks(new: nn.Module, old: nn.Module) -> None:
    """Hooks registered on the replaced MLP keep firing on its replacement: the replacement
    uses the same hook dictionaries (shared, not copied, so the caller's handles still remove
    them)."""
    for attr in _HOOK_DICTS:
        if hasattr(old, attr):
            object.__setattr__(new, attr, getattr(old, attr))
