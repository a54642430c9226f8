"""Safetensors read a tensor at a time: a header that lies about a tensor's bytes is one line
(issue 22 case 5), a shard changed on disk during a run is refused naming it (case 2), and an
aborted writer closes every file even when closing fails again (case 4)."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch

from prunewise.errors import PrunewiseError
from prunewise.storage.shards import Checkpoint, ShardWriter, read_file_header


def _write(folder, tensors):
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    writer = ShardWriter(folder, specs, max_shard_bytes=1 << 30)
    for k, t in tensors.items():
        writer.put(k, t)
    writer.close()
    return folder / "model.safetensors"


def _rewrite_header(path, change):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n :])


@pytest.mark.parametrize(
    "change",
    [
        lambda h: h["a"].update(dtype="F16"),
        lambda h: h["a"].update(shape=[4, 5]),
        lambda h: h["a"].update(data_offsets=[0, 99]),
    ],
)
def test_a_header_that_lies_is_one_line_naming_the_tensor(tmp_path, change):
    path = _write(tmp_path, {"a": torch.ones(4, 4), "b": torch.zeros(3)})
    _rewrite_header(path, change)
    with pytest.raises(PrunewiseError, match=r"model.safetensors.*tensor a"):
        read_file_header(path)


def test_a_shard_replaced_during_a_run_is_refused_naming_it(tmp_path):
    path = _write(tmp_path, {"a": torch.ones(4, 4), "b": torch.zeros(3)})
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.read("a"), torch.ones(4, 4))
    replacement = tmp_path / "new"
    replacement.mkdir()
    _write(replacement, {"a": torch.full((4, 4), 2.0), "b": torch.zeros(3)})
    os.replace(replacement / "model.safetensors", path)
    with pytest.raises(PrunewiseError, match=r"model.safetensors changed on disk"):
        ckpt.read("a")


def test_abort_closes_every_file_even_when_closing_fails(tmp_path):
    writer = ShardWriter(tmp_path, [("a", torch.float32, (4,)), ("b", torch.float32, (4,))], max_shard_bytes=16)
    assert len(writer.handles) == 2

    class Full:
        def __init__(self, fh):
            self.fh, self.closed_once = fh, False

        def close(self):
            self.fh.close()
            self.closed_once = True
            raise OSError(errno.ENOSPC, "No space left on device")

    wrapped = [Full(fh) for fh in writer.handles]
    writer.handles = wrapped
    writer.abort()  # does not raise
    assert all(w.closed_once for w in wrapped)
