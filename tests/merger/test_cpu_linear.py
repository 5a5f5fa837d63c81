"""merger.cpu_linear: a reduced-precision Linear multiplied in float32 on a CPU without the dtype's
instructions, in the dtype where it has them; either way, what a Linear in that dtype computes."""

from __future__ import annotations

import pytest
import torch

from merger import cpu_linear
from merger.streamed_modules import TensorPool

AVX2_ONLY = frozenset({"avx", "avx2", "fma"})


@pytest.mark.parametrize(
    ("dtype", "flags", "kernel"),
    [
        (torch.float32, AVX2_ONLY, "in-dtype"),
        (torch.bfloat16, AVX2_ONLY, "float32-accumulate"),
        (torch.bfloat16, AVX2_ONLY | {"avx512_bf16"}, "in-dtype"),
        (torch.bfloat16, AVX2_ONLY | {"amx_bf16"}, "in-dtype"),
        (torch.bfloat16, AVX2_ONLY | {"avx512_fp16"}, "float32-accumulate"),
        (torch.float16, AVX2_ONLY, "float32-accumulate"),
        (torch.float16, AVX2_ONLY | {"amx_fp16"}, "in-dtype"),
        (torch.bfloat16, frozenset(), "float32-accumulate"),  # another architecture: no x86 flags
    ],
)
def test_the_kernel_follows_the_cpus_instructions_for_the_dtype(dtype, flags, kernel):
    assert cpu_linear.kernel_for(dtype, flags).name == kernel


def _bf16_operands(stored: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    draws = torch.Generator().manual_seed(11)
    x = torch.randn(9, 64, generator=draws).to(torch.bfloat16)  # (rows, in)
    weight = torch.randn(48, 64, generator=draws).to(stored)  # (out, in)
    bias = torch.randn(48, generator=draws).to(stored)  # (out,)
    return x, weight, bias


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_float32_accumulation_is_the_exact_product_rounded_once(stored):
    """Against the product of the bf16 values in float64: within one rounding to bf16 (half a unit in the last
    place) plus float32 accumulation's error, for weights stored in bf16 or rounded to it first (unrounded
    float32 weights leave 121 of these 432 outputs outside that bound)."""
    x, weight, bias = _bf16_operands(stored)
    out = cpu_linear.KERNELS["float32-accumulate"].linear(x, weight, bias)  # (rows, out)
    w, b = weight.to(torch.bfloat16).double(), bias.to(torch.bfloat16).double()
    exact = x.double() @ w.T + b  # (rows, out)
    magnitude = x.double().abs() @ w.abs().T + b.abs()  # what float32 accumulation's error scales with
    assert out.dtype == torch.bfloat16
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + magnitude * 2**-20).all()


def test_a_float32_model_on_bf16_weights_multiplies_them_exactly():
    x, weight, bias = _bf16_operands(torch.bfloat16)
    pool = TensorPool()
    out = cpu_linear.KERNELS["in-dtype"].linear(x.float(), weight, bias, pool.staging)
    assert torch.equal(out, torch.nn.functional.linear(x.float(), weight.float(), bias.float()))


def test_the_staging_buffer_is_reused_for_every_block():
    pool = TensorPool()
    first = pool.staging(torch.Size((64, 128)), torch.float32)
    smaller = pool.staging(torch.Size((10, 128)), torch.float32)
    assert first.data_ptr() == smaller.data_ptr() and smaller.shape == (10, 128)
    assert pool.staging(torch.Size((4, 7)), torch.bfloat16).data_ptr() == first.data_ptr()
