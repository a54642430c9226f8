"""The compressed sparse form: lossless packing, the kernel against ``x @ W.T``, the fallback, shards."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from prunewise.errors import PrunewiseError
from prunewise.sparse import bitmask, kernel
from prunewise.sparse.checkpoint import SPARSE_FILE, Packed, read_sparse, write_sparse
from prunewise.storage.shards import INDEX

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# odd sizes, a tail of at most 8 columns, exactly 16, one column, long rows
SHAPES = [(7, 5), (33, 17), (5, 16), (9, 1), (13, 40), (6, 100), (64, 576), (3, 1543)]


def sparse(shape, dtype, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    w[torch.rand(shape, generator=g) > density] = 0
    w[0] = 0  # an all-zero row
    return w


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 24)])
def test_pack_round_trips_bit_for_bit(shape, dtype):
    w = sparse(shape, dtype)
    values, mask = bitmask.pack(w)
    rows = w.numel() // shape[-1]
    assert values.numel() == int((w != 0).sum())
    assert tuple(mask.shape) == (rows, (shape[-1] + 7) // 8)
    assert torch.equal(bits(bitmask.unpack(values, mask, shape)), bits(w))


def test_negative_zero_and_nan_survive_and_count_as_stored():
    w = torch.tensor([[0.0, -0.0, float("nan"), 1.5, 0.0, 0.0, 0.0, 0.0, 2.0]])
    values, mask = bitmask.pack(w)
    assert values.numel() == 4  # -0.0, nan, 1.5, 2.0
    assert mask.tolist() == [[0b00001110, 0b00000001]]
    assert torch.equal(bits(bitmask.unpack(values, mask, w.shape)), bits(w))
    assert torch.equal(bits(kernel.unpack(kernel.padded(values), mask, bitmask.row_offsets(mask), w.shape)), bits(w))


def test_row_offsets_count_each_rows_bits():
    mask = torch.tensor([[0xFF, 0x01], [0x00, 0x00], [0x0F, 0x80]], dtype=torch.uint8)
    assert bitmask.row_offsets(mask).tolist() == [0, 9, 9, 14]


def test_packed_size_and_when_it_pays():
    assert bitmask.packed_bytes(numel=1000, nnz=300, cols=100, itemsize=2) == 300 * 2 + 10 * 13
    dense = torch.randn(8, 64)
    assert not bitmask.worth_packing(dense)  # nothing to skip: the bitmask only adds bytes
    assert bitmask.worth_packing(sparse((8, 64), torch.float32, 0.5))
    assert not bitmask.worth_packing(torch.zeros(64))  # vectors stay as they are


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_dense_matmul(shape, dtype):
    if kernel.ext() is None:
        pytest.fail("the sparse kernel did not build on this machine (see the log)")
    w = sparse(shape, dtype)
    values, mask = bitmask.pack(w)
    offsets = bitmask.row_offsets(mask)
    out = torch.full(shape, 7.0).to(dtype)  # a used scratch matrix: every element is overwritten
    assert torch.equal(bits(kernel.unpack(kernel.padded(values), mask, offsets, shape, out)), bits(w))
    for n in (1, 3, 8, 13, 16):
        x = torch.randn(n, shape[1], generator=torch.Generator().manual_seed(n))
        got = kernel.ext().linear(x, kernel.padded(values), mask, offsets, shape[-1])
        ref = x.double() @ w.double().t()
        assert got.shape == (n, shape[0])
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * (1 + ref.abs().max().item()))
        assert bool((got[:, 0] == 0).all())  # the all-zero row gives exact zeros
        xh = x.to(dtype)  # activations in the weights' dtype (bf16: the dot-product path where there is one)
        got = kernel.ext().linear(xh, kernel.padded(values), mask, offsets, shape[-1])
        ref = xh.double() @ w.double().t()
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * (1 + ref.abs().max().item()))


def test_the_build_is_the_path_asked_for():
    """Native builds take the widest path the CPU has; PRUNEWISE_SPARSE_ISA narrows it (run below)."""
    asked = os.environ.get("PRUNEWISE_SPARSE_ISA", "native")
    flags = set(kernel.cpu_flags())
    if asked == "native":
        if not flags:
            pytest.skip("no /proc/cpuinfo flags to predict the path from")
        want = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma", "f16c"} <= flags else "scalar"
    else:
        want = asked
    assert kernel.isa().split("+")[0] == want


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_the_narrower_paths_equal_dense_too(isa):
    """The kernel's AVX2 and scalar paths, compiled on this CPU, pass the same checks as its widest one:
    on an AVX-512 machine they would otherwise never run (a separate build each, about 35 s)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("PRUNEWISE_SPARSE_ISA narrows x86-64 builds only")
    if isa == "avx2" and not {"avx2", "fma", "f16c"} <= set(kernel.cpu_flags()):
        pytest.skip("this CPU has no AVX2 with FMA and F16C")
    if kernel.isa().split("+")[0] == isa:
        pytest.skip(f"{isa} is this machine's native path: the rest of this file tests it")
    tests = "kernel_equals_dense_matmul or matches_linear_for_decode or path_asked_for"
    env = dict(os.environ, PRUNEWISE_SPARSE_ISA=isa)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", tests, __file__],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_an_unknown_isa_is_refused(monkeypatch):
    monkeypatch.setattr(kernel, "_EXT", [])
    monkeypatch.setenv("PRUNEWISE_SPARSE_KERNEL", "1")
    monkeypatch.setenv("PRUNEWISE_SPARSE_ISA", "avx9")
    with pytest.raises(ValueError, match="native, avx2, scalar"):
        kernel.ext()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_linear_matches_linear_for_decode_and_prefill(dtype):
    lin = torch.nn.Linear(40, 24, bias=True).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(sparse((24, 40), dtype))
    sl = kernel.SparseLinear.from_linear(lin)
    assert sl.nbytes == int((lin.weight != 0).sum()) * lin.weight.element_size() + 24 * 5
    limit = kernel.KERNEL_TOKENS[dtype]
    for tokens in (1, limit, limit + 1, 2 * limit + 1):  # kernel, kernel, dense, dense on a reused scratch
        x = torch.randn(1, tokens, 40).to(dtype)
        want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
        got = sl(x)
        assert got.dtype == dtype and got.shape == (1, tokens, 24)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(got.float(), want, rtol=tol, atol=tol)


def test_without_the_kernel_layers_run_dense_and_say_so_once(monkeypatch, caplog):
    monkeypatch.setattr(kernel, "_EXT", [])
    monkeypatch.setenv("PRUNEWISE_SPARSE_KERNEL", "0")
    lin = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(sparse((8, 16), torch.float32))
    sl = kernel.SparseLinear.from_linear(lin)
    with caplog.at_level(logging.WARNING, logger="prunewise.sparse.kernel"):
        x = torch.randn(1, 16)
        assert torch.allclose(sl(x), lin(x), atol=1e-6)
        sl(x)
    assert kernel.isa() == "none"
    assert sum("sparse kernel unavailable" in r.getMessage() for r in caplog.records) == 1


def test_a_scalar_only_build_is_said_once_and_not_fast(monkeypatch, caplog):
    from torch.utils import cpp_extension

    monkeypatch.setattr(kernel, "_EXT", [])
    monkeypatch.setenv("PRUNEWISE_SPARSE_KERNEL", "1")
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: types.SimpleNamespace(isa=lambda: "scalar"))
    with caplog.at_level(logging.WARNING, logger="prunewise.sparse.kernel"):
        assert kernel.isa() == "scalar"
        assert not kernel.fast()
    assert sum("only its scalar loop runs" in r.getMessage() for r in caplog.records) == 1


def test_checkpoint_round_trips_and_cuts_shards(tmp_path):
    tensors = {
        "embed.weight": torch.randn(50, 16),  # dense: stays as it is
        "layers.0.q.weight": sparse((16, 16), torch.bfloat16),
        "layers.0.norm.weight": torch.ones(16),
        "layers.0.experts": sparse((4, 8, 16), torch.float16),
        "layers.0.q.bias": torch.zeros(16),
    }
    spec = write_sparse(tmp_path, tensors.items(), max_shard_bytes=300)
    assert sorted(spec["tensors"]) == ["layers.0.experts", "layers.0.q.weight"]
    assert spec["dense_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert spec["stored_bytes"] < spec["dense_bytes"]
    assert (tmp_path / INDEX).is_file() and not list(tmp_path.glob(".shard-*"))
    back = dict(read_sparse(tmp_path))
    assert sorted(back) == sorted(tensors)
    for key, t in tensors.items():
        got = back[key].unpack() if isinstance(back[key], Packed) else back[key]
        assert got.dtype == t.dtype and torch.equal(bits(got.contiguous()), bits(t))


def test_a_damaged_bitmask_is_refused(tmp_path):
    write_sparse(tmp_path, [("w", sparse((8, 16), torch.float32))])
    spec = json.loads((tmp_path / SPARSE_FILE).read_text())
    spec["tensors"]["w"]["nnz"] += 1
    (tmp_path / SPARSE_FILE).write_text(json.dumps(spec))
    with pytest.raises(PrunewiseError, match="do not match its bitmask"):
        dict(read_sparse(tmp_path))
