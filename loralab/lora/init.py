"""PiSSA and OLoRA: adapters that start from the weight's own principal directions, with the
base keeping the residual, and their save-time conversion to a plain LoRA on the original base.

For a dense map W (d_out x d_in, `nn.Linear` orientation; GPT-2's Conv1D stores W^T and is
transposed first, as PEFT does with `fan_in_fan_out`), scale s and rank r:

- PiSSA (Meng et al. 2024, PEFT's `pissa_init`): W = U S V^T (thin SVD, fp32),
      A0 = sqrt(S_r / s) V_r^T   (r x d_in),    B0 = U_r sqrt(S_r / s)   (d_out x r),
  so s B0 A0 = U_r S_r V_r^T, the best rank-r approximation of W. With `svd_niter` = k > 0 the
  top-r triplets come from a randomized SVD with k subspace iterations (Halko et al. 2011,
  Algorithm 5.1, as `torch.svd_lowrank(W, r, k)`, PEFT's `pissa_niter_k`), its Gaussian test
  matrix drawn from a generator seeded with 0: the same W always gives the same A0, B0.
- OLoRA (Buyukakyuz 2024, PEFT's `olora_init`): W = Q R (reduced QR, fp32),
      A0 = R[:r]   (r x d_in),    B0 = Q[:, :r]   (d_out x r)     (no division by s, as PEFT).

Both set A = A0, B = B0 and replace the base weight by the residual W_res = W - s B0 A0, so the
untrained layer computes W_res + s B0 A0 = W (up to rounding of W_res in the weight's dtype).
The factorisations run in float32 whatever the weight's dtype; the factors are cast back to the
adapter's dtype and the residual is formed from the cast factors, W_res = W - s B0 A0 in fp32,
then cast to the weight's dtype (explicit casts only).

A fused layer adapted on some output slices (GPT-2 c_attn on q and v) gets each slice's pair
from that slice's own rows W[lo:hi], so the layer is the same as PiSSA / OLoRA of the separate
q and v projections.

The layer remembers A0 and B0 as non-persistent buffers (`lora_A0`, `lora_B0`: not in the state
dict, so checkpoints hold only the trained A, B; a resumed run rebuilds them by running the same
deterministic init on the original weights). At save time the trained adapter is converted to
the equivalent update of the unmodified base (PEFT's `subtract_mutated_init`):

    W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] [A; A0] = W + s B' A',

a plain LoRA of rank 2r per slice with the same scale s (PEFT's conversion doubles r and
lora_alpha, alpha' / r' = alpha / r; with rsLoRA alpha' = sqrt(2) alpha).
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.errors import UserError
from loralab.lora.layer import LoRALinear
from loralab.models.surgery import untie_weight

RESIDUAL_INITS = ("pissa", "olora")
"""Inits that move the top of W into the adapter and leave the residual in the base."""
INIT_A, INIT_B = "lora_A0", "lora_B0"
"""Buffer names of the initial factors on an initialised layer."""
INIT_NAME = "lora_init"
"""Attribute naming the init of an initialised layer (`initial_kind`)."""
_SVD_SEED = 0
"""Seed of the randomized SVD's Gaussian test matrix (fixed: the init depends on W only)."""


def pissa_factors(w: torch.Tensor, rank: int, scale: float, niter: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of PiSSA for W (d_out x d_in, float32): A0 (r x d_in), B0 (d_out x r) with
    s B0 A0 = U_r S_r V_r^T. `niter` 0: exact thin SVD (torch.linalg.svd); k > 0: randomized
    SVD with k power iterations (`randomized_svd`). Source: PEFT `LoraLayer.pissa_init`."""
    if niter > 0:
        u, s, v = randomized_svd(w, rank, niter)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = (s[:rank] / scale).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def olora_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of OLoRA for W (d_out x d_in, float32): W = Q R, A0 = R[:r] (r x d_in),
    B0 = Q[:, :r] (d_out x r). Source: PEFT `LoraLayer.olora_init`."""
    q, r = torch.linalg.qr(w)
    return r[:rank].contiguous(), q[:, :rank].contiguous()


def randomized_svd(w: torch.Tensor, rank: int, niter: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, V) with W ~ U diag(S) V^T of rank `rank` (U: d_out x r, S: r, V: d_in x r).

    Halko, Martinsson & Tropp 2011, Algorithm 5.1 with `niter` subspace iterations, step for
    step as `torch.svd_lowrank(W, q=rank, niter=niter)`, but with the Gaussian test matrix from
    a private generator seeded with `_SVD_SEED` (drawn on the CPU, so every device gets the same
    one): no global random state is read or advanced."""
    tall = w.shape[0] >= w.shape[1]
    a = w if tall else w.T
    gen = torch.Generator().manual_seed(_SVD_SEED)
    omega = torch.randn(a.shape[1], rank, generator=gen, dtype=a.dtype).to(a.device)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    u, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    u, v = q @ u, vh.T
    return (u, s, v) if tall else (v, s, u)


def _float_weight(layer: LoRALinear) -> torch.Tensor:
    """The layer's W as a float32 (d_out x d_in) copy; UserError for a quantized base."""
    weight = layer.weight
    if type(weight) not in (torch.Tensor, nn.Parameter) or not weight.is_floating_point():
        raise UserError(f"PiSSA / OLoRA need a float base weight, not {type(weight).__name__} "
                        f"({weight.dtype}); initialise before quantizing or use init kaiming")
    w = weight.detach().to(torch.float32)
    return w.T if layer.conv1d else w


@torch.no_grad()
def initialise(layer: LoRALinear, init: str, niter: int = 0) -> None:
    """PiSSA (`init` "pissa") or OLoRA ("olora") in place on a fresh layer: A, B := A0, B0 per
    adapted slice, the base weight := W - s B0 A0 on those rows, and buffers `lora_A0`,
    `lora_B0` (copies of A0, B0 in the adapter's dtype) for the save-time conversion. See the
    module docstring for the formulas. Raises UserError for an unknown init, a merged layer,
    a quantized base or a rank above min(rows of a slice, d_in)."""
    if init not in RESIDUAL_INITS:
        raise UserError(f"init {init!r} is not one of {', '.join(RESIDUAL_INITS)}")
    if layer.merged or hasattr(layer, INIT_A):
        raise UserError("PiSSA / OLoRA initialise a fresh, unmerged adapter only")
    w = _float_weight(layer)
    r, s = layer.rank, layer.scale
    a_dtype, b_dtype, w_dtype = layer.lora_A.dtype, layer.lora_B.dtype, layer.weight.dtype
    residual = w.clone()
    row = 0
    for j, (lo, hi) in enumerate(layer.slices):
        if r > min(hi - lo, w.shape[1]):
            raise UserError(f"init {init} takes the top {r} directions of a {hi - lo} x "
                            f"{w.shape[1]} weight, which has at most {min(hi - lo, w.shape[1])}; "
                            f"choose rank <= {min(hi - lo, w.shape[1])} or init kaiming")
        if init == "pissa":
            a0, b0 = pissa_factors(w[lo:hi], r, s, niter)
        else:
            a0, b0 = olora_factors(w[lo:hi], r)
        a0, b0 = a0.to(a_dtype), b0.to(b_dtype)
        layer.lora_A[j * r:(j + 1) * r] = a0
        layer.lora_B[row:row + hi - lo] = b0
        residual[lo:hi] -= s * (b0.to(torch.float32) @ a0.to(torch.float32))
        row += hi - lo
    layer.weight.copy_((residual.T if layer.conv1d else residual).to(w_dtype))
    layer.register_buffer(INIT_A, layer.lora_A.detach().clone(), persistent=False)
    layer.register_buffer(INIT_B, layer.lora_B.detach().clone(), persistent=False)
    setattr(layer, INIT_NAME, f"pissa_niter_{niter}" if init == "pissa" and niter else init)


def initial_kind(layer: LoRALinear) -> str | None:
    """How a PiSSA / OLoRA layer was initialised, in PEFT's `init_lora_weights` spelling
    ("pissa", "pissa_niter_<k>", "olora"); None for any other layer."""
    kind = getattr(layer, INIT_NAME, None)
    return kind if isinstance(kind, str) else None


def initial_factors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A0, B0) of a PiSSA / OLoRA layer, in the layout of (lora_A, lora_B); None for a layer
    whose base weight is the original one (kaiming / gaussian init, or a loaded adapter)."""
    a0, b0 = getattr(layer, INIT_A, None), getattr(layer, INIT_B, None)
    if isinstance(a0, torch.Tensor) and isinstance(b0, torch.Tensor):
        return a0, b0
    return None


def converted_factors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A', B', rank per slice): the layer's update as a plain LoRA on the ORIGINAL base weight,
    in the compact layout of `LoRALinear` (A' stacked per slice, B' rows per slice).

    A layer with initial factors (PiSSA / OLoRA) gives A'_j = [A_j; A0_j] (2r x d_in) and
    B'_j = [B_j, -B0_j] (h_j x 2r), so s B'_j A'_j = s (B_j A_j - B0_j A0_j) and
    W + s B' A' = W_res + s B A (PEFT's `subtract_mutated_init`); rank 2r, same scale s.
    Any other layer gives (lora_A, lora_B, r) unchanged."""
    a, b, r = layer.lora_A.detach(), layer.lora_B.detach(), layer.rank
    init = initial_factors(layer)
    if init is None:
        return a, b, r
    a0, b0 = init
    a_parts, b_parts, row = [], [], 0
    for j, (lo, hi) in enumerate(layer.slices):
        a_parts += [a[j * r:(j + 1) * r], a0[j * r:(j + 1) * r].to(a.dtype)]
        b_parts.append(torch.cat([b[row:row + hi - lo], -b0[row:row + hi - lo].to(b.dtype)], 1))
        row += hi - lo
    return torch.cat(a_parts), torch.cat(b_parts), 2 * r


def initialise_model(model: nn.Module, layers: list[LoRALinear], init: str,
                     niter: int = 0) -> None:
    """`initialise` every layer in `layers` of `model` (a no-op for kaiming / gaussian). A base
    weight shared with another module (a tied lm_head and input embedding, preset `all`) is
    untied first, so the residual replaces the head's weight only, never the embeddings."""
    if init in RESIDUAL_INITS:
        for layer in layers:
            untie_weight(model, layer.base)
            initialise(layer, init, niter)


__all__ = ["INIT_A", "INIT_B", "INIT_NAME", "RESIDUAL_INITS", "converted_factors",
           "initial_factors", "initial_kind", "initialise", "initialise_model", "olora_factors",
           "pissa_factors", "randomized_svd"]
