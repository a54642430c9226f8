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

from ..errors import PrunewiseError
from .record import RunRecord

log = logging.getLogger(__name__)


RESULTS = "results.jsonl"


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every result line of ``path`` (a results.jsonl or its folder). A line that is not UTF-8 JSON
    (a torn last line, a damaged byte), is not a result line, or whose run record has wrong-typed
    fields is skipped with one warning naming the file, the line and why."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        return []
    rows = []
    for i, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            log.warning("%s:%d: a line that is not UTF-8 text, skipped (a damaged file?)", path, i)
            continue
        except json.JSONDecodeError:
            log.warning("%s:%d: unreadable line skipped (an interrupted write?)", path, i)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            log.warning("%s:%d: not a prunewise result line (no 'key'); skipped", path, i)
            continue
        if row.get("kind") != "dense":
            try:
                RunRecord.from_dict(row)
            except PrunewiseError as exc:
                log.warning("%s:%d: %s; skipped", path, i, exc)
                continue
        elif not (row.get("ppl") is None or isinstance(row.get("ppl"), dict)):
            log.warning("%s:%d: a dense line whose 'ppl' is not an object; skipped", path, i)
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
