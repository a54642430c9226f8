"""Run records read back with their types checked: a wrong-typed field is one line naming the file
and the field, never an AttributeError later (issue 22 case 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunewise.errors import PrunewiseError
from prunewise.run.record import RunRecord


def _record() -> dict:
    return {
        "schema": 2,
        "config": {
            "model": "m",
            "metric": "wanda",
            "allocator": "uniform",
            "sparsity": 0.5,
            "pattern": "unstructured",
            "eval_seqlen": 64,
        },
        "pruning": {"sparsity": 0.5, "target": 0.5, "mask_sha256": "ab", "layers": []},
        "pruned": {"ppl": 12.0, "data": "wiki", "split": "test", "seqlen": 64, "tokens": 640},
    }


@pytest.mark.parametrize(
    "path, value, field",
    [
        (("pruned",), "abc", "pruned"),
        (("pruned",), [1, 2], "pruned"),
        (("pruning", "sparsity"), "half", "pruning.sparsity"),
        (("pruning", "layers"), {"a": 1}, "pruning.layers"),
        (("config", "eval_seqlen"), "sixty-four", "config.eval_seqlen"),
        (("config", "sparsity"), [0.5], "config.sparsity"),
        (("timings",), [1], "timings"),
        (("wall_s",), "slow", "wall_s"),
    ],
)
def test_wrong_typed_fields_are_one_line_naming_file_and_field(tmp_path, path, value, field):
    data = _record()
    where = data
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    (tmp_path / "pruning.json").write_text(json.dumps(data))
    with pytest.raises(PrunewiseError, match=rf"{tmp_path / 'pruning.json'}.*{field.replace('.', '[.]')}"):
        RunRecord.read(tmp_path)


def test_a_well_typed_record_reads(tmp_path):
    (tmp_path / "pruning.json").write_text(json.dumps(_record()))
    rec = RunRecord.read(tmp_path)
    assert rec.sparsity == 0.5 and rec.pruned["ppl"] == 12.0


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="no /proc (Linux) to reset the peak in")
def test_peak_memory_is_the_runs_own_after_a_reset():
    """A sweep runs many records in one process: after reset_peak_memory() the peak is measured
    anew, so a row's peak is its own and not the largest of the rows before it. The CLI's tuning
    keeps freed memory in the heap; an earlier peak (here 1.2 GB of 20 MB blocks, freed) leaves
    resident free chunks that a new block would reuse unseen, and a freed block stays resident,
    unless the reset gives them back first."""
    from prunewise.model.malloc import keep_freed_memory
    from prunewise.run.saving import peak_memory, reset_peak_memory

    if not keep_freed_memory():
        pytest.skip("no glibc to tune")
    earlier = [torch.ones(20 * 2**20 // 4) for _ in range(60)]
    del earlier
    reset_peak_memory()
    before = peak_memory()["peak_rss_gb"]
    big = torch.ones(400 * 2**20 // 4)  # 400 MiB, every page touched
    during = peak_memory()["peak_rss_gb"]
    del big
    reset_peak_memory()
    after = peak_memory()["peak_rss_gb"]
    assert during - before > 0.4
    assert during - after > 0.35
