"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

DoRA splits the adapted weight into a magnitude and a direction:

    W' = m * (W + s B A) / ||W + s B A||_c

where W is the frozen (d_out, d_in) weight, s B A the LoRA update and ||.||_c the L2 norm of
each output row over the input dimension (the paper's "column" norm, written for W^T), so
W' row i has norm m_i. m (d_out,) is trained and starts at ||W||_c, so an untrained adapter
(B = 0) leaves the layer unchanged. Following the paper (section 4.3) and PEFT
(`peft.tuners.lora.dora.DoraLinearLayer`), the norm is a constant in backward: only its
current value is used, and no gradient flows through it into A or B. With f = m / ||W + s B A||_c
the layer computes, without dropout,

    y = f * (x W^T + s (x A^T) B^T) + b

(the bias is not rescaled), and with dropout D on the LoRA branch PEFT's formula

    y = x W^T + b + (f - 1) * (D(x) W^T) + f * s (D(x) A^T) B^T,

which equals the first one when D is the identity. This module holds the maths on dense
(d_out, d_in) tensors; `loralab.lora.layer.LoRALinear(dora=True)` applies it to a layer.

Cost over plain LoRA: each forward forms the d_out x d_in matrix W + s B A once (a W-sized
temporary, freed at once) to take its row norms, and keeps the (tokens x d_out) pre-scaling
output for m's gradient.
"""

from __future__ import annotations

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in at least float32 (bf16 / fp16 upcast; fp32 and fp64 as they are)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def weight_norm(rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + delta||_c: the L2 norm of each output row of W + delta, shape (d_out,).

    `rows` is W as (d_out, d_in) (a GPT-2 Conv1D weight transposed), `delta` the update s B A
    of the same shape. Computed in at least float32 (a sum of d_in squares loses precision in
    bf16; fp64 stays fp64) and outside autograd: DoRA treats the norm as a constant in
    backward (paper section 4.3, PEFT's `weight_norm.detach()`)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(_wide(rows) + _wide(delta), dim=1)


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """f = m / ||W + s B A||_c (d_out,), in m's dtype: the factor each output is rescaled by.
    The gradient flows to m only (`norm` is a constant)."""
    return magnitude / norm.to(magnitude.dtype)


def merged_rows(rows: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', norm): the merged weight W' = f (W + delta) as (d_out, d_in) and the norm
    ||W + delta||_c it used, both in at least float32. `unmerged_rows` needs that norm to undo
    the merge (the norm of W' itself is m, not the norm of W + delta)."""
    norm = weight_norm(rows, delta)
    with torch.no_grad():
        f = _wide(magnitude.detach()) / norm
        return f[:, None] * (_wide(rows) + _wide(delta)), norm


def unmerged_rows(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                  norm: torch.Tensor) -> torch.Tensor:
    """W = W' / f - delta (in at least float32), the inverse of `merged_rows` with the norm it
    returned; exact up to rounding when no entry of m is 0 (f = 0 erases its row)."""
    with torch.no_grad():
        f = _wide(magnitude.detach()) / norm
        return _wide(merged) / f[:, None] - _wide(delta)


__all__ = ["magnitude_scale", "merged_rows", "unmerged_rows", "weight_norm"]
