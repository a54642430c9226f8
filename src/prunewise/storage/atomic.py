"""All-or-nothing writes: a file or a folder appears complete under its final name, or not at all.

Everything is written to a hidden temporary sibling (same filesystem) and renamed into place, so a
killed or failed run never leaves something that looks finished. Used for checkpoints, run
records, the converted bundled model, token ids and the statistic cache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` left by a process that no longer runs (killed
    with SIGKILL, or by a power cut, while writing); those of a live process are left alone.
    Their names carry the writer's pid: ``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``."""
    target = Path(target)
    removed = []
    for path in target.parent.glob(f".{target.name}.*-*-*"):
        kind, _, rest = path.name[len(target.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            if kind == "old" and not target.exists() and (path / target.name).exists():
                os.replace(path / target.name, target)  # killed mid-swap: the old folder is the only copy
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_folder(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``target``; on success it becomes ``target``.

    With ``replace`` an existing ``target`` is moved aside only once the new folder is complete,
    then deleted; without it an existing non-empty ``target`` makes the rename fail. Temporary
    siblings that a dead process left behind are removed first (:func:`clean_stale`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        old = None
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary sibling of ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return atomic_write(path, write)
