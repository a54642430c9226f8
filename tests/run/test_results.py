"""``results.jsonl`` lines read back: a damaged line is skipped with a warning naming the file and
the line, never the end of a sweep or a report (issue 22 cases 6 and 7)."""

from __future__ import annotations

import json

from prunewise.run.results import read_results


def _line(key: str, **extra) -> bytes:
    row = {"schema": 2, "key": key, "kind": "run", "status": "ok", "config": {"model": "m"}, **extra}
    return (json.dumps(row) + "\n").encode()


def test_a_non_utf8_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    path.write_bytes(_line("a") + b'{"key": "b", "x": "\xff\xfe"}\n' + _line("c"))
    with caplog.at_level("WARNING"):
        rows = read_results(path)
    assert [r["key"] for r in rows] == ["a", "c"]
    assert f"{path}:2" in caplog.text and "not UTF-8" in caplog.text


def test_a_wrong_typed_line_is_skipped_naming_the_field(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    path.write_bytes(_line("a", pruned="abc") + _line("b", pruning=[1, 2]) + _line("c"))
    with caplog.at_level("WARNING"):
        rows = read_results(path)
    assert [r["key"] for r in rows] == ["c"]
    assert f"{path}:1" in caplog.text and "field pruned" in caplog.text and "field pruning" in caplog.text
