"""LoRA: low-rank adapters on frozen dense layers (Hu et al. 2021).

For a frozen dense map y = x W^T + b (W: d_out x d_in), LoRA learns A (r x d_in) and B (d_out x r):

    y = x W^T + b + s * (D(x) A^T) B^T,      s = alpha / r   (rsLoRA: alpha / sqrt(r))

where D is dropout on the LoRA branch only. B starts at zero, so an untrained adapter leaves the
model's outputs unchanged; A starts from the Kaiming-uniform init of `nn.Linear` (or a Gaussian).

The map is one `torch.autograd.Function` (`_LoRAMatmul`) because the obvious composition
`base(x) + lora_B(lora_A(dropout(x))) * s` keeps a dropped copy of x per layer and allocates three
T x d_out temporaries (B's output, the scaling, the sum). Here:

- forward computes `out = x W^T + b`, then adds the low-rank term in place with `addmm_`;
- it saves x, A, B (and a reference to the frozen W, needed for dx; no copy), the small
  u = D(x) A^T (T x k r) and nothing of size T x d_out; with dropout it also saves the mask's
  16-bit uniforms (2 bytes an element, `loralab.lora.dropout`), not a dropped copy of x (4 bytes),
  and re-forms the 0 / 1 mask from them in backward by one comparison; 1 / P(keep) is folded
  into s;
- backward forms
      gB = g B,  dB = s g^T u,  dA = s gB^T D(x),  dx = g W + s D'(gB A)
  and never a gradient for the frozen W (unless W itself requires grad).

GPT-2's fused `c_attn` (Conv1D, output [q | k | v]) is handled by giving each adapted output slice
j its own pair (A_j, B_j): A is the stack [A_1; ...; A_k] (k r x d_in) and B the stack of B_j
(sum of slice widths x r), a block-structured update applied by the same function with x saved
once (loralib's MergedLinear).

With `dora=True` the layer is DoRA's (`loralab.lora.dora`): a trained magnitude m (one per output
feature, over the whole output even when only some slices are adapted, as PEFT treats a fused
c_attn as one layer) rescales each output row of W + s B A to norm m. Without dropout that is
the plain map above, bias left out, times f = m / ||W + s B A||_c, plus the bias; with dropout
(and under torch.compile) it is PEFT's formula written with plain differentiable ops. A layer
without DoRA takes exactly the plain path.
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from loralab.errors import UserError
from loralab.lora.dora import magnitude_scale, merged_rows, unmerged_rows, weight_norm
from loralab.lora.dropout import draw_seed, keep_float, random_bits
from loralab.lora.targets import in_out_features, is_adaptable

# --------------------------------------------------------------------------------------------
# The autograd function


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's dtype when autocast is on, else x's dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _LoRAMatmul(torch.autograd.Function):
    """y = x W^T + b + s * [ (D(x) A_j^T) B_j^T  on output slice j ]; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float,
                slices: tuple[tuple[int, int], ...], p: float, seed: int, conv1d: bool):
        dtype = compute_dtype(x)
        d_in = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, d_in).to(dtype)                      # (N, d_in)
            w = _dense(weight).to(dtype)
            b = bias.to(dtype) if bias is not None else None
            if conv1d:                                      # Conv1D stores W^T: (d_in, d_out)
                out = torch.addmm(b, x2, w) if b is not None else x2 @ w
            else:
                out = F.linear(x2, w, b)                            # (N, d_out)
            # D(x) = keep * x / P(keep): the 1 / P(keep) goes into the scale
            bits, rescale = None, 1.0
            if p > 0:
                bits = random_bits(x2.shape, seed, x2.device)       # kept for backward
                keep, rescale = keep_float(bits, p, dtype)
                xd = keep.mul_(x2)                                  # the mask's storage, reused
                del keep
            else:
                xd = x2
            u = xd @ lora_a.to(dtype).T                             # (N, k r)
            del xd
            _add_low_rank(out, u, lora_b.to(dtype), slices, scale * rescale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, u, bits)
        ctx.meta = (scale * rescale, slices, p, conv1d, dtype,
                    bias is not None and bias.requires_grad)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, u, bits = ctx.saved_tensors
        scale, slices, p, conv1d, dtype, bias_grad = ctx.meta       # scale is s / P(keep)
        d_in = x.shape[-1]
        rank = lora_a.shape[0] // len(slices)
        with torch.autocast(x.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (N, d_out)
            x2 = x.reshape(-1, d_in).to(dtype)
            keep = keep_float(bits, p, dtype)[0] if bits is not None else None
            a = lora_a.to(dtype)
            b = lora_b.to(dtype)
            g_b = torch.empty_like(u)                               # (N, k r): g_j B_j per slice
            d_b = torch.empty_like(b)
            row = 0
            for j, (lo, hi) in enumerate(slices):
                cols = slice(j * rank, (j + 1) * rank)
                g_j, b_j = g[:, lo:hi], b[row:row + hi - lo]
                g_b[:, cols] = g_j @ b_j
                d_b[row:row + hi - lo] = (g_j.T @ u[:, cols]).mul_(scale)
                row += hi - lo
            xd = x2 * keep if keep is not None else x2              # D(x) P(keep)
            d_a = (g_b.T @ xd).mul_(scale)                          # (k r, d_in)
            del xd
            d_x = d_w = d_bias = None
            if ctx.needs_input_grad[0]:
                w = _dense(weight).to(dtype)
                d_x = g @ w.T if conv1d else g @ w                  # (N, d_in): frozen path
                if keep is None:
                    d_x.addmm_(g_b, a, alpha=scale)
                else:
                    d_x.add_(keep.mul_(g_b @ a), alpha=scale)
                d_x = d_x.view(x.shape).to(x.dtype)
            if ctx.needs_input_grad[1]:                             # only if W is not frozen
                d_w = (x2.T @ g) if conv1d else (g.T @ x2)
                d_w = d_w.to(weight.dtype)
            if bias_grad:
                d_bias = g.sum(0)
        return (d_x, d_w, d_bias, d_a.to(lora_a.dtype), d_b.to(lora_b.dtype),
                None, None, None, None, None)


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """A quantized frozen weight (a torchao tensor subclass such as NF4Tensor or an int8 tensor:
    a QLoRA base) dequantized for this one use, so only its packed form is kept between forward
    and backward; a plain tensor is returned as it is."""
    if type(weight) in (torch.Tensor, nn.Parameter) or not hasattr(weight, "__tensor_flatten__"):
        return weight
    if hasattr(weight, "get_original_weight"):  # torchao NF4Tensor
        return weight.get_original_weight()
    return weight.dequantize()


def _add_low_rank(out: torch.Tensor, u: torch.Tensor, b: torch.Tensor,
                  slices: tuple[tuple[int, int], ...], scale: float) -> None:
    """out[:, slice_j] += s * u_j B_j^T, in place (no T x d_out temporary)."""
    rank = u.shape[1] // len(slices)
    row = 0
    for j, (lo, hi) in enumerate(slices):
        out[:, lo:hi].addmm_(u[:, j * rank:(j + 1) * rank], b[row:row + hi - lo].T, alpha=scale)
        row += hi - lo


def lora_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                slices: tuple[tuple[int, int], ...], p: float = 0.0, seed: int = 0,
                conv1d: bool = False) -> torch.Tensor:
    """Functional form of the adapted map; `conv1d` means `weight` is stored as (d_in, d_out)."""
    return _LoRAMatmul.apply(x, weight, bias, lora_a, lora_b, scale, slices, p, seed, conv1d)


# --------------------------------------------------------------------------------------------
# The module


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` or GPT-2 `Conv1D` (`self.base`) plus a LoRA update.

    `lora_A` is (k r, d_in) and `lora_B` is (sum of slice widths, r) for k adapted output
    slices; with one slice covering the whole output this is exactly PEFT's layout. With
    `dora=True`, `lora_magnitude_vector` is DoRA's magnitude m (d_out,), initialised to
    ||W + s B A||_c (PEFT's `lora_magnitude_vector`); otherwise it is None.
    """

    lora_magnitude_vector: nn.Parameter | None

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 slices: tuple[tuple[int, int], ...] | None = None,
                 init: Literal["kaiming", "gaussian"] = "kaiming", dora: bool = False) -> None:
        super().__init__()
        if not is_adaptable(base):
            raise UserError(f"LoRA adapts Linear and Conv1D layers, not {type(base).__name__}")
        d_in, d_out = in_out_features(base)
        if rank > max(d_in, d_out):  # B A has rank <= min(d_in, d_out) whatever r is
            raise UserError(f"LoRA rank {rank} is larger than both sides of a {d_in} x {d_out} "
                            f"{type(base).__name__} (B A has rank at most {min(d_in, d_out)}, "
                            f"and A, B would outgrow the layer); choose rank <= {max(d_in, d_out)}")
        self.base = base
        self.conv1d = not isinstance(base, nn.Linear)
        self.slices = tuple(slices) if slices else ((0, d_out),)
        self.rank, self.scale, self.dropout = rank, scale, dropout
        self.merged = False
        width = sum(hi - lo for lo, hi in self.slices)
        device, dtype = self.weight.device, self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(len(self.slices) * rank, d_in, device=device,
                                               dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(width, rank, device=device, dtype=dtype))
        for block in self.lora_A.data.split(rank):
            if init == "gaussian":
                nn.init.normal_(block, std=1.0 / rank)
            else:
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))  # nn.Linear's default, as PEFT
        magnitude = None
        if dora:  # m = ||W + s B A||_c, as PEFT initialises it (= ||W||_c while B = 0)
            with torch.no_grad():
                norm = weight_norm(self._rows(_dense(self.weight)), self.delta_weight())
            magnitude = nn.Parameter(norm.to(dtype))
        self.register_parameter("lora_magnitude_vector", magnitude)

    @property
    def in_features(self) -> int:
        return in_out_features(self.base)[0]

    @property
    def out_features(self) -> int:
        return in_out_features(self.base)[1]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (so code that reads `layer.weight` keeps working)."""
        return cast(torch.Tensor, self.base.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return cast("torch.Tensor | None", self.base.bias)

    @property
    def dora(self) -> bool:
        """Whether the layer is DoRA's (it has a magnitude vector)."""
        return self.lora_magnitude_vector is not None

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        """(A, B), plus DoRA's magnitude m: the trainable parameters (the
        `loralab.models.heads.CarriesAdapters` protocol)."""
        if self.lora_magnitude_vector is not None:
            return self.lora_A, self.lora_B, self.lora_magnitude_vector
        return self.lora_A, self.lora_B

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, scale={self.scale:g}, dropout={self.dropout}, "
                f"slices={list(self.slices)}, merged={self.merged}"
                + (", dora=True" if self.dora else ""))

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A base weight as (d_out, d_in) (a view: Conv1D stores W^T)."""
        return weight.T if self.conv1d else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        p = self.dropout if self.training else 0.0
        weight = self.weight
        # QAT (torchao FakeQuantizedLinear base): the frozen path and the adapter both see the
        # fake-quantized input Q(x), as in the deployed quantized model; W becomes Q(W)
        fq_x = getattr(self.base, "activation_fake_quantizer", None)
        fq_w = getattr(self.base, "weight_fake_quantizer", None)
        if fq_x is not None:
            x = fq_x(x)
        if fq_w is not None:
            weight = fq_w(weight)
        if self.lora_magnitude_vector is not None:
            return self._dora(x, weight, p)
        if torch.compiler.is_compiling():
            return self._composed(x, _dense(weight), p)
        seed = draw_seed() if p > 0 else 0
        return lora_matmul(x, weight, self.bias, self.lora_A, self.lora_B,
                           self.scale, self.slices, p, seed, self.conv1d)

    def _composed(self, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        """The same map written with plain differentiable ops, for torch.compile.

        Under compilation the graph, not `_LoRAMatmul`, decides what is stored: inductor fuses
        the dropout, scaling and adds into neighbouring kernels and its partitioner saves or
        recomputes the cheap elementwise results. (The eager Function's host-side dropout seed
        would break the graph; here dropout is inductor's own random op.)
        """
        bias = self.bias
        if self.conv1d:
            assert bias is not None  # transformers' Conv1D always has a bias
            out = torch.matmul(x, weight) + bias
        else:
            out = F.linear(x, weight, bias)
        xd = F.dropout(x, p, training=True) if p > 0 else x
        return out + self._low_rank(xd, out)

    def _low_rank(self, xd: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """s (xd A_j^T) B_j^T on each adapted slice j and 0 elsewhere, shaped like `out`, by plain
        differentiable ops."""
        u = xd @ self.lora_A.T                                      # (..., k r)
        if self.slices == ((0, out.shape[-1]),):
            return self.scale * (u @ self.lora_B.T)
        pieces, row, at = [], 0, 0
        for j, (lo, hi) in enumerate(self.slices):
            if lo > at:
                pieces.append(out.new_zeros(*out.shape[:-1], lo - at))
            u_j = u[..., j * self.rank:(j + 1) * self.rank]
            pieces.append(u_j @ self.lora_B[row:row + hi - lo].T)
            row, at = row + hi - lo, hi
        if at < out.shape[-1]:
            pieces.append(out.new_zeros(*out.shape[:-1], out.shape[-1] - at))
        return self.scale * torch.cat(pieces, dim=-1)

    def _dora(self, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        """DoRA's map (`loralab.lora.dora`), f = m / ||W + s B A||_c with the norm a constant:

            p = 0:  y = f * (x W^T + s (x A^T) B^T) + b       (the plain kernel, bias left out)
            p > 0:  y = x W^T + b + (f - 1) * (D(x) W^T) + f * s (D(x) A^T) B^T   (PEFT's form)

        The p > 0 form runs the frozen matmul twice, as PEFT does. Under torch.compile both are
        written in plain differentiable ops. Shapes as `forward`; the output is in the matmuls'
        compute dtype."""
        magnitude = self.lora_magnitude_vector
        assert magnitude is not None
        dense = _dense(weight)
        with torch.no_grad():
            norm = weight_norm(self._rows(dense), self.delta_weight())
        f = magnitude_scale(magnitude, norm)                        # (d_out,), grad to m only
        bias = self.bias
        if p == 0 and not torch.compiler.is_compiling():
            z = lora_matmul(x, weight, None, self.lora_A, self.lora_B, self.scale, self.slices,
                            conv1d=self.conv1d)
            out = z * f.to(z.dtype)
            return out + bias.to(out.dtype) if bias is not None else out
        w = self._rows(dense)
        if p == 0:  # under torch.compile: the same map as the kernel path, in plain ops
            z = F.linear(x, w)
            z = z + self._low_rank(x, z)
            out = z * f.to(z.dtype)
            return out + bias.to(out.dtype) if bias is not None else out
        xd = F.dropout(x, p, training=True)
        base = F.linear(x, w, bias)                                 # x W^T + b
        base_d = F.linear(xd, w)                                    # D(x) W^T
        low = self._low_rank(xd, base_d)                            # s (D(x) A^T) B^T
        fc = f.to(base_d.dtype)
        return base + (fc - 1) * base_d + fc * low

    def delta_weight(self) -> torch.Tensor:
        """s * B A as a (d_out, d_in) matrix (zero outside the adapted slices)."""
        d_in, d_out = in_out_features(self.base)
        delta = torch.zeros(d_out, d_in, dtype=self.lora_A.dtype, device=self.lora_A.device)
        row = 0
        for j, (lo, hi) in enumerate(self.slices):
            a_j = self.lora_A[j * self.rank:(j + 1) * self.rank]
            delta[lo:hi] = self.lora_B[row:row + hi - lo] @ a_j
            row += hi - lo
        return delta.mul_(self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """W += s B A (in place); with DoRA W = m (W + s B A) / ||W + s B A||_c, keeping that
        norm for `unmerge`. The layer then computes base(x) only."""
        if not self.merged:
            if self.lora_magnitude_vector is not None:
                rows = self._rows(self.weight)
                merged, norm = merged_rows(rows, self.delta_weight(), self.lora_magnitude_vector)
                rows.copy_(merged.to(rows.dtype))
                self.register_buffer("_dora_norm", norm, persistent=False)
            else:
                self._add_delta(+1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= s B A (DoRA: W = W' / f - s B A with the norm kept by `merge`): undo `merge`."""
        if self.merged:
            if self.lora_magnitude_vector is not None:
                rows = self._rows(self.weight)
                norm = self._buffers.pop("_dora_norm")
                assert norm is not None
                rows.copy_(unmerged_rows(rows, self.delta_weight(), self.lora_magnitude_vector,
                                         norm).to(rows.dtype))
            else:
                self._add_delta(-1.0)
            self.merged = False

    def _add_delta(self, sign: float) -> None:
        delta = self.delta_weight().to(self.weight.dtype)
        self.weight.add_(delta.T if self.conv1d else delta, alpha=sign)


__all__ = ["LoRALinear", "compute_dtype", "lora_matmul"]
