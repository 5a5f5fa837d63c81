"""The modules merger.streaming runs on mapped checkpoint tensors, each reading its weight as it uses it.

A `TensorPool` maps each stored tensor of the layer being run once.  `StreamedEmbedding` looks its
rows up in the mapped weight; `StreamedLinear` multiplies a block of weight rows at a time (with this
CPU's kernel for the model's dtype, merger.cpu_linear) and gives each block's pages back;
`StreamedUnmergedLinear` is merger.unmerged's reference forward the same way, a block of W0's rows
cast, multiplied and turned into its rows of the kind's row scale at a time.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from merger import cpu_linear, formula
from merger.checkpoint import MappedTensor, StoredTensor
from merger.kinds import joined_row_scale
from merger.unmerged import UnmergedLinear

LINEAR_BLOCK_BYTES = 16 << 20  # a streamed Linear multiplies a block of weight rows of about this size at a time


class TensorPool:
    """The mapped tensors of the layer the models are in: each stored tensor mapped once, until `close`."""

    def __init__(self) -> None:
        self._maps: dict[tuple[Path, int], MappedTensor] = {}
        self._staging = torch.empty(0, dtype=torch.uint8)  # grown to the largest cast block asked for

    def mapped(self, stored: StoredTensor) -> MappedTensor:
        key = (stored.file, stored.offset)
        if key not in self._maps:
            self._maps[key] = MappedTensor(stored)
        return self._maps[key]

    def tensor(self, stored: StoredTensor, dtype: torch.dtype) -> torch.Tensor:
        """The stored tensor in `dtype`: the mapped view itself when it already is, else a cast copy."""
        view = self.mapped(stored).view
        return view if view.dtype == dtype else view.to(dtype)

    def staging(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A reused buffer of that shape and dtype for a block's cast copy: contents undefined, valid until the
        next call (a fresh block-sized tensor per block would fault in fresh pages every time)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self._staging.numel() < nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8)
        return self._staging[:nbytes].view(dtype).view(shape)

    def release(self, stored: StoredTensor) -> None:
        """Give back its resident pages; it stays mapped (a later use faults them in from the page cache)."""
        mapped = self._maps.get((stored.file, stored.offset))
        if mapped is not None:
            mapped.drop_pages()

    def unmap(self, stored: StoredTensor) -> None:
        """Forget one mapping (unmapped once its views are gone): the vocabulary's, as soon as it was used."""
        self._maps.pop((stored.file, stored.offset), None)

    def close(self) -> None:
        """Unmap everything (the views die with the last reference)."""
        self._maps.clear()


class StreamedWeights(nn.Module):
    """A module whose weight (and bias) are stored tensors, mapped from the pool while it runs."""

    def __init__(self, pool: TensorPool, weight: StoredTensor, bias: StoredTensor | None, dtype: torch.dtype):
        super().__init__()
        self.pool, self.weight_stored, self.bias_stored, self.dtype = pool, weight, bias, dtype

    @property
    def keys(self) -> tuple[str, ...]:
        """The checkpoint names it reads."""
        return tuple(t.spec.name for t in (self.weight_stored, self.bias_stored) if t is not None)

    def bias(self) -> torch.Tensor | None:
        return None if self.bias_stored is None else self.pool.tensor(self.bias_stored, self.dtype)  # (out,)


class StreamedEmbedding(nn.Module):
    """nn.Embedding on a mapped weight: the rows are looked up in the stored dtype, then cast (the same values)."""

    def __init__(self, pool: TensorPool, weight: StoredTensor, dtype: torch.dtype):
        super().__init__()
        self.pool, self.weight_stored, self.dtype = pool, weight, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., hidden)
        rows = F.embedding(ids, self.pool.mapped(self.weight_stored).view).to(self.dtype)
        self.pool.unmap(self.weight_stored)
        return rows


class StreamedLinear(StreamedWeights):
    """nn.Linear on a mapped (out, in) weight, a block of rows (LINEAR_BLOCK_BYTES) at a time.

    Each block's pages are given back once multiplied, so a Linear of any width costs one block of
    weight memory (and the pool's staging buffer for a block's cast copy, when the kernel computes in
    another dtype than the stored one).  Used for the head and for every plain Linear of the layers.
    """

    def __init__(self, pool: TensorPool, weight: StoredTensor, bias: StoredTensor | None, dtype: torch.dtype):
        super().__init__(pool, weight, bias, dtype)
        self.kernel = cpu_linear.kernel_for(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        mapped = self.pool.mapped(self.weight_stored)
        weight = mapped.view  # (out, in), stored dtype
        bias = self.bias()  # (out,)
        out = x.new_empty((*x.shape[:-1], weight.shape[0]))  # (..., out)
        for rows in formula.row_slices(weight, LINEAR_BLOCK_BYTES // weight.element_size()):
            block_bias = None if bias is None else bias[rows]  # (rows,)
            out[..., rows] = self.kernel.linear(x, weight[rows], block_bias, self.pool.staging)
            mapped.drop_rows(rows)
        self.pool.unmap(self.weight_stored)
        return out


class StreamedUnmergedLinear(StreamedWeights):
    """merger.unmerged.UnmergedLinear on a mapped (out, in) W0, a block of output rows at a time.

    Per block (formula.row_slices), W0's rows are cast to the model's dtype and multiplied, and with
    ΔW's rows they give that block's row scale (AdapterKind.blocked_row_scale's blocks, recomputed on
    every forward as `recompute_scale` does); then the block's pages are given back.  So an adapted
    module costs a block of W0 (and of ΔW), never a whole cast copy.  The low-rank branch runs on the
    activations, as UnmergedLinear's.  A transposed (Conv1D) weight keeps UnmergedLinear.
    """

    def __init__(self, pool: TensorPool, unmerged: UnmergedLinear, weight: StoredTensor, bias: StoredTensor | None):
        super().__init__(pool, weight, bias, unmerged.weight.dtype)
        self.kind, self.adapter = unmerged.kind, unmerged.adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        mapped = self.pool.mapped(self.weight_stored)
        w0 = mapped.view  # (out, in), stored dtype
        base_out = x.new_empty((*x.shape[:-1], w0.shape[0]))  # (..., out): W0 x
        scales = []
        for rows, w0_rows, _, scale in self.kind.row_blocks(w0, self.adapter):  # w0_rows: (rows, in) fp32
            base_out[..., rows] = F.linear(x, w0_rows.to(self.dtype))
            scales.append(scale)
            mapped.drop_rows(rows)
        self.pool.unmap(self.weight_stored)
        delta_out = self.kind.delta_forward(x, self.adapter)  # (..., out)
        y = formula.combine_outputs(base_out, delta_out, joined_row_scale(scales), self.kind.add_residual)
        bias = self.bias()
        return y if bias is None else y + bias
