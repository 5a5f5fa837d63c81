"""How a streamed Linear multiplies on this CPU, per dtype: a registry of small kernel classes.

torch's bfloat16 and float16 F.linear need the CPU's own instructions for the dtype (AVX512_BF16 or
AMX for bfloat16, AVX512_FP16 or AMX_FP16 for float16) to be fast; without them it runs a fallback.
Here (AMD EPYC, 2 cores, AVX2) that fallback takes 6x a float32 F.linear at a prefill's 240 rows
(a (240, 2048) by (5632, 2048) product: 292 ms against 53 ms) and is no faster at a decode step's
8 rows, and it rounds more often than once: a 1B bf16 verify spent 155 of its 206 s there.

`Float32Accumulate` is the kernel for such a dtype on such a CPU: the weight block is upcast
(exactly) into the pool's staging buffer a few MiB at a time, the input likewise, the product
accumulated in float32 and rounded once to the dtype, as a native bf16 GEMM with float32
accumulation (oneDNN's, vLLM's) computes it.  `InDtype` is F.linear in the model's dtype, for
float32 and for a dtype the CPU has instructions for.  `kernel_for` chooses; the whole-model oracle
of the tests uses the same choice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from merger import cpu, formula

STAGING_BYTES = 4 << 20  # a cast copy this size is still in cache when multiplied (3.9 against 2.2 GB/s at 32 MiB)
Staging = Callable[[torch.Size, torch.dtype], torch.Tensor]  # a reused buffer of that shape and dtype
NATIVE_FLAGS = {  # any one of them: the CPU multiplies the dtype itself
    torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16"}),
    torch.float16: frozenset({"avx512_fp16", "amx_fp16"}),
}


def _fresh(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


class LinearKernel:
    """x @ weightᵀ + bias in x's dtype, for a block of weight rows in any stored dtype."""

    name: ClassVar[str]
    compute_dtype: ClassVar[torch.dtype | None]  # None: x's own

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, staging: Staging = _fresh
    ) -> torch.Tensor:  # x: (..., in), weight: (rows, in), bias: (rows,) -> (..., rows)
        compute = self.compute_dtype or x.dtype
        if weight.dtype != x.dtype and compute != x.dtype:
            weight = weight.to(x.dtype)  # the model's weight is in its dtype, whatever the file stores
        bias = None if bias is None else bias.to(x.dtype).to(compute)
        x_compute = x.to(compute)  # (..., in)
        if weight.dtype == compute:
            return F.linear(x_compute, weight, bias).to(x.dtype)
        out = x.new_empty((*x.shape[:-1], weight.shape[0]))  # (..., rows)
        for rows in formula.row_slices(weight, STAGING_BYTES // compute.itemsize):
            staged = staging(weight[rows].shape, compute).copy_(weight[rows])  # (part, in)
            out[..., rows] = F.linear(x_compute, staged, None if bias is None else bias[rows])  # rounded once
        return out


class InDtype(LinearKernel):
    name = "in-dtype"
    compute_dtype = None


class Float32Accumulate(LinearKernel):
    name = "float32-accumulate"
    compute_dtype = torch.float32


KERNELS: dict[str, LinearKernel] = {k.name: k() for k in (InDtype, Float32Accumulate)}


def kernel_for(dtype: torch.dtype, cpu_flags: frozenset[str] | None = None) -> LinearKernel:
    """The kernel for a model in `dtype` on a CPU with these flags (this machine's by default)."""
    native = NATIVE_FLAGS.get(dtype)
    if native is None:
        return KERNELS[InDtype.name]
    flags = _this_cpu_flags() if cpu_flags is None else cpu_flags
    return KERNELS[InDtype.name if flags & native else Float32Accumulate.name]


@functools.cache
def _this_cpu_flags() -> frozenset[str]:
    return cpu.flags(cpu.processor())
