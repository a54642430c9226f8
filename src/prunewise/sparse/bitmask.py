"""The compressed form of a sparse matrix: its non-zero values and a packed bitmask of where they are.

A tensor of shape ``(..., cols)`` is seen as ``rows = prod(shape[:-1])`` rows. It is stored as

- ``values``: the entries whose bits are not all zero, row by row, in the tensor's own dtype;
- ``mask``: ``uint8 [rows, ceil(cols / 8)]``, bit ``j`` (least significant first) of byte ``b`` of a
  row set when column ``8b + j`` is stored; the padding bits of a row's last byte are zero.

"Zero" means every bit zero: a ``-0.0`` left by a masked multiply is stored as a value, so
unpacking gives back the very bits packed (lossless for every dtype, NaN payloads included).

Why a bitmask rather than indices: a bitmask costs 1/8 byte per weight whatever the sparsity; 16-bit
column indices cost 2 bytes per kept weight. At density ``d`` the bitmask is the smaller whenever
``d > 1/16`` (sparsity below 93.75%), so at the 50–80% the papers prune to it always is: at 70% in
bf16 values plus bitmask are ``0.3 x 2 + 0.125 = 0.725`` bytes per weight (0.36 of dense) against
``0.3 x (2 + 2) = 1.2`` (0.60) with indices. The kernel (:mod:`prunewise.sparse.kernel`) reads it
16 columns at a time with one AVX-512 expand.
"""

from __future__ import annotations

import torch

_BITS = 1 << torch.arange(8, dtype=torch.uint8)


def nonzero_bits(t: torch.Tensor) -> torch.Tensor:
    """Which entries have any bit set (``-0.0`` counts as set: it is not the all-zero pattern)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints) != 0


def pack(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, mask)`` of ``t`` (module docstring)."""
    cols = t.shape[-1]
    rows = t.numel() // max(cols, 1)
    flat = t.detach().reshape(rows, cols)
    keep = nonzero_bits(flat)
    values = flat[keep]  # row-major order
    pad = -cols % 8
    if pad:
        keep = torch.nn.functional.pad(keep, (0, pad))
    mask = (keep.view(rows, -1, 8).to(torch.uint8) * _BITS).sum(-1, dtype=torch.uint8)
    return values, mask


def unpack(values: torch.Tensor, mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense tensor ``pack`` was given, bit for bit (the reference; the kernel module has a fast one)."""
    cols = shape[-1]
    keep = ((mask.unsqueeze(-1) & _BITS) != 0).reshape(mask.shape[0], -1)[:, :cols]
    dense = torch.zeros(keep.shape, dtype=values.dtype)
    dense[keep] = values[: int(keep.sum())]
    return dense.reshape(shape)


def row_offsets(mask: torch.Tensor) -> torch.Tensor:
    """``int64 [rows + 1]``: where each row's values start, from the popcount of its mask bytes."""
    counts = _POPCOUNT[mask.long()].sum(-1)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def packed_bytes(numel: int, nnz: int, cols: int, itemsize: int) -> int:
    """Bytes of the compressed form of a ``numel``-entry tensor with ``nnz`` stored values."""
    rows = numel // max(cols, 1)
    return nnz * itemsize + rows * ((cols + 7) // 8)


def worth_packing(t: torch.Tensor) -> bool:
    """Whether the compressed form of floating-point matrix ``t`` is smaller than ``t``."""
    if t.dim() < 2 or not t.is_floating_point() or t.numel() == 0:
        return False
    nnz = int(nonzero_bits(t).sum())
    return packed_bytes(t.numel(), nnz, t.shape[-1], t.element_size()) < t.numel() * t.element_size()
