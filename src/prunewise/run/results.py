"""``results.jsonl``: one JSON line per run of a sweep (its key, status and the run's record
summary, :meth:`~prunewise.run.record.RunRecord.summary`), appended and flushed as each run ends;
read by sweeps (to resume) and reports."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


RESULTS = "results.jsonl"


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every result line of ``path`` (a results.jsonl or its folder); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: unreadable line skipped (an interrupted write?)", path, i)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            log.warning("%s:%d: not a prunewise result line (no 'key'); skipped", path, i)
            continue
        rows.append(row)
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def latest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last line of every key (a retried run supersedes its failure), in first-seen order."""
    by_key: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_key[row["key"]] = row
    return list(by_key.values())
