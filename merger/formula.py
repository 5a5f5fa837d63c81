"""The maths of SPEC §1 as pure tensor functions: the one source of truth.

Every adapter kind fuses a Linear weight into the same shape of result:

    Ŵ = s ⊙ (W0 + ΔW) + c · ΔW        s: (out, 1) per-row scale, c ∈ {0, 1}

    D²-LoRA  s = n0 / ‖W0 + ΔW‖_row    c = 1   (Eq. 3: the residual is added again)
    DoRA     s = m  / ‖W0 + ΔW‖_row    c = 0
    LoRA     s = 1                      c = 0

so the merged weight, the unmerged forward used for verification and the
training layer all call the functions below. Nothing here knows about files.

With ΔW = s·B A the same result is a rank-k update of a row-scaled base, which
is how many adapters are served in one batch without merging (SPEC §1):

    Ŵ x = s ⊙ (W0 x) + B̃ A x        B̃ = diag(s + c) · s_lora · B

and as an exact PEFT DoRA adapter: B′ = diag((s + c)/s) · s_lora · B with
scaling 1 and magnitude m = s ⊙ ‖W0 + B′A‖_row.
Tensors are in torch layout, W0: (out, in).
"""

from __future__ import annotations

import math

import torch

from merger.errors import D2LoraError

COMPUTE_DTYPE = torch.float32
NORM_DTYPE = torch.float64
# Float64 row norms go a block of rows at a time, about this many elements per
# block: a float64 copy of a whole (4096, 4096) weight is a fresh 128 MiB
# allocation that is page-faulted in on every call; a block's memory is reused.
# Each row's norm is computed exactly as on the whole tensor.
BLOCK_ELEMENTS = 1 << 20


class FusionError(D2LoraError):
    """A fused weight cannot be formed (zero row norm, non-finite values)."""


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def low_rank_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s · B A in fp32.  a: (r, in), b: (out, r) -> (out, in)."""
    return (b.to(COMPUTE_DTYPE) @ a.to(COMPUTE_DTYPE)).mul_(scaling)


def d2lora_factors(
    a_pos: torch.Tensor,
    b_pos: torch.Tensor,
    a_neg: torch.Tensor,
    b_neg: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two signed branches as one rank-2r pair: ΔW = s · B A with A = [A₊; A₋], B = [B₊, −τB₋].

    a_*: (r, in), b_*: (out, r) -> A (2r, in), B (out, 2r), in the factors' dtype (autograd flows through).
    """
    return torch.cat([a_pos, a_neg], dim=0), torch.cat([b_pos, -tau * b_neg], dim=1)


def d2lora_delta(
    a_pos: torch.Tensor,
    b_pos: torch.Tensor,
    a_neg: torch.Tensor,
    b_neg: torch.Tensor,
    scaling: float,
    tau: float,
) -> torch.Tensor:
    """ΔW = s · (B₊A₊ − τ·B₋A₋) in fp32.  a_*: (r, in), b_*: (out, r) -> (out, in).

    One matmul of the concatenated factors (d2lora_factors), so the sum is
    accumulated once in fp32 rather than as two rounded products.
    """
    a, b = d2lora_factors(a_pos.to(COMPUTE_DTYPE), b_pos.to(COMPUTE_DTYPE), a_neg.to(COMPUTE_DTYPE),
                          b_neg.to(COMPUTE_DTYPE), tau)  # fmt: skip
    return low_rank_delta(a, b, scaling)


def _rows_per_block(w: torch.Tensor, block_elements: int | None = None) -> int:
    """Rows of w in about block_elements elements (default BLOCK_ELEMENTS).  w: (out, in)"""
    return max(1, (BLOCK_ELEMENTS if block_elements is None else block_elements) // max(1, w.shape[-1]))


def row_blocks(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views of consecutive row blocks of w, about BLOCK_ELEMENTS each.  (out, in) -> ((rows, in), ...)"""
    return w.split(_rows_per_block(w))


def row_slices(w: torch.Tensor, block_elements: int | None = None) -> list[slice]:
    """The rows of row_blocks(w), as slices (blocks of about block_elements, default BLOCK_ELEMENTS).  w: (out, in)"""
    step = _rows_per_block(w, block_elements)
    return [slice(start, min(start + step, w.shape[0])) for start in range(0, w.shape[0], step)]


def row_norm(w: torch.Tensor) -> torch.Tensor:
    """L2 norm of every output row, accumulated in float64.  (out, in) -> (out, 1)."""
    return torch.cat([torch.linalg.vector_norm(block.to(NORM_DTYPE), dim=1, keepdim=True) for block in row_blocks(w)])


def adapted_row_norm(w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """n′ = ‖W0 + ΔW‖_row in float64, a block of rows at a time, never forming W′.  (out, in) -> (out, 1)."""
    blocks = zip(row_blocks(w0), row_blocks(delta), strict=True)
    return torch.cat([row_norm(w.to(COMPUTE_DTYPE) + d) for w, d in blocks])


def low_rank_adapted_row_norm(
    w0: torch.Tensor, w0_norm: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """n′ = ‖W0 + s·B A‖_row without forming any (out, in) tensor.  -> (out, 1) float64

    ‖W0 + ΔW‖² = ‖W0‖² + 2⟨W0, ΔW⟩ + ‖ΔW‖² row by row, where ⟨W0, ΔW⟩ = s·Σ_k B ⊙ (W0 Aᵀ) and
    ‖ΔW‖² = s²·Σ_k (B G) ⊙ B with G = A Aᵀ.  One (out, in) @ (in, k) product reads W0 once; the rest
    is (out, k) work in float64.  For the training layer, whose weights change every step: adapted_row_norm
    (which merging uses) would write and reread a float64 (out, in) tensor per step.  The expansion loses
    precision only when n′ ≪ n0, i.e. when ΔW nearly cancels a row of W0.
    w0: (out, in); w0_norm: (out, 1) = row_norm(w0); a: (k, in); b: (out, k).
    """
    projected = (w0 @ a.to(w0.dtype).T).to(NORM_DTYPE)  # (out, k): W0 Aᵀ
    a64, b64 = a.to(NORM_DTYPE), b.to(NORM_DTYPE) * scaling  # (k, in), (out, k)
    cross = (b64 * projected).sum(dim=1, keepdim=True)  # (out, 1): ⟨W0, ΔW⟩
    delta_sq = ((b64 @ (a64 @ a64.T)) * b64).sum(dim=1, keepdim=True)  # (out, 1): ‖ΔW‖²
    return (w0_norm.to(NORM_DTYPE).square() + 2 * cross + delta_sq).clamp_min(0).sqrt()


def zero_norm_error(adapted_norm: torch.Tensor, first_row: int = 0) -> FusionError:
    """The error for the zero rows of n′ (out, 1), numbered from first_row (a block's first row)."""
    rows = ((adapted_norm.squeeze(1) == 0).nonzero().flatten()[:5] + first_row).tolist()
    return FusionError(f"adapted weight has zero norm in rows {rows}")


def norm_ratio(target_norm: torch.Tensor, adapted_norm: torch.Tensor) -> torch.Tensor:
    """s = target / n′ as fp32, (out, 1).  Raises FusionError on a zero row."""
    if bool((adapted_norm == 0).any()):
        raise zero_norm_error(adapted_norm)
    return (target_norm.to(NORM_DTYPE) / adapted_norm).to(COMPUTE_DTYPE)


def directional_scale(target_norm: torch.Tensor, w_adapted: torch.Tensor) -> torch.Tensor:
    """s = target / ‖W′‖_row as fp32, (out, 1).  Raises FusionError on a zero row."""
    return norm_ratio(target_norm, row_norm(w_adapted))


def d2lora_row_scale(w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """n0 / n′ with n0 = ‖W0‖_row, n′ = ‖W0 + ΔW‖_row.  -> (out, 1) fp32."""
    return norm_ratio(row_norm(w0), adapted_row_norm(w0, delta))


def dora_row_scale(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m / ‖W0 + ΔW‖_row.  magnitude: (out,) -> (out, 1) fp32."""
    return norm_ratio(magnitude.reshape(-1, 1), adapted_row_norm(w0, delta))


def fuse(w0: torch.Tensor, delta: torch.Tensor, row_scale: torch.Tensor | None, add_residual: bool) -> torch.Tensor:
    """Ŵ = s ⊙ (W0 + ΔW) + c·ΔW in fp32.  w0, delta: (out, in); row_scale: (out, 1) or None.

    For merging only (not differentiable in row_scale): after W′ = W0 + ΔW is
    formed, the scale and the residual are applied in place on it.
    """
    fused = w0.to(COMPUTE_DTYPE) + delta  # W′ (out, in), a fresh tensor
    if row_scale is not None:
        fused.mul_(row_scale)
    return fused.add_(delta) if add_residual else fused


def combine_outputs(
    base_out: torch.Tensor,
    delta_out: torch.Tensor,
    row_scale: torch.Tensor | None,
    add_residual: bool,
) -> torch.Tensor:
    """The unmerged forward, y = s ⊙ (W0 x + ΔW x) + c·ΔW x, without bias.

    base_out, delta_out: (..., out); row_scale: (out, 1) or None.  Equal to
    x @ fuse(...).T up to rounding, without ever forming Ŵ.
    """
    adapted = base_out + delta_out
    if row_scale is not None:
        adapted = adapted * row_scale.reshape(-1).to(adapted.dtype)
    return adapted + delta_out if add_residual else adapted


def check_finite(fused: torch.Tensor, module: str) -> None:
    """Raise FusionError naming the module if Ŵ holds NaN or ±inf.

    One pass, no temporary: aminmax propagates NaN, and ±inf is its own extreme.
    """
    if fused.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(fused))).all()):
        raise FusionError(f"{module}: fused weight has non-finite values")


def _row_factor(row_scale: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """The per-row scale as float64 (out, 1); plain LoRA (None) is 1 on every row."""
    if row_scale is None:
        return torch.ones(out_features, 1, dtype=NORM_DTYPE)
    return row_scale.reshape(-1, 1).to(NORM_DTYPE)


def row_scaled_b(b: torch.Tensor, scaling: float, row_scale: torch.Tensor | None, add_residual: bool) -> torch.Tensor:
    """B̃ = diag(s + c) · scaling · B, formed in float64 and rounded once to fp32.  b: (out, k) -> (out, k)

    row_scale: (out, 1) as the kinds compute it for fusing, or None (s = 1).
    """
    factor = _row_factor(row_scale, b.shape[0]) + (1.0 if add_residual else 0.0)  # (out, 1)
    return (b.to(NORM_DTYPE) * scaling * factor).to(COMPUTE_DTYPE)


def dora_b(b: torch.Tensor, scaling: float, row_scale: torch.Tensor | None, add_residual: bool) -> torch.Tensor:
    """B′ = diag((s + c)/s) · scaling · B in fp32, the lora_B of the equivalent DoRA adapter.  b: (out, k) -> (out, k)

    Raises FusionError when a row scale is zero (DoRA cannot express it).
    """
    scale = _row_factor(row_scale, b.shape[0])  # (out, 1)
    if bool((scale == 0).any()):
        rows = (scale.squeeze(1) == 0).nonzero().flatten()[:5].tolist()
        raise FusionError(f"row scale is zero in rows {rows}; no DoRA adapter has this weight")
    factor = (scale + (1.0 if add_residual else 0.0)) / scale
    return (b.to(NORM_DTYPE) * scaling * factor).to(COMPUTE_DTYPE)


def dora_magnitude(
    w0: torch.Tensor, a: torch.Tensor, b_dora: torch.Tensor, row_scale: torch.Tensor | None
) -> torch.Tensor:
    """m = s ⊙ ‖W0 + B′A‖_row, norms in float64, as fp32.  w0: (out, in), a: (k, in), b_dora: (out, k) -> (out,)"""
    adapted = adapted_row_norm(w0, low_rank_delta(a, b_dora, 1.0))  # (out, 1) float64
    return (_row_factor(row_scale, w0.shape[0]) * adapted).to(COMPUTE_DTYPE).reshape(-1)
