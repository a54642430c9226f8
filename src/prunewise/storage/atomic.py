"""All-or-nothing writes: a file or a folder appears complete under its final name, or not at all.

Everything is written to a hidden temporary sibling (same filesystem) and renamed into place, so a
killed or failed run never leaves something that looks finished. Used for checkpoints, run
records, the converted bundled model, token ids, the statistic cache and streamed models' scratch
checkpoints.

**Who still needs a temporary sibling** is decided by a lock, never by a pid: its writer holds an
exclusive advisory lock (``flock``) on it for as long as it writes — on the file itself, or on a
``.lock`` file inside a folder — and the kernel drops the lock when the writer exits, however it
exits. :func:`clean_stale` removes only siblings whose lock it can take. A pid in a name means
nothing to a process in another PID namespace (a container) or on another host sharing the folder;
a lock means the same to all of them on one machine, and across hosts where the filesystem
supports locks (NFS with lockd). A sibling without a lock (one written by prunewise before locks,
or caught between its creation and its lock) is removed only when its pid is dead here and it is
more than a minute old.

**Permissions.** Temporary files and folders are created private (``mkstemp`` 0600, ``mkdtemp``
0700); before they get their final name they are given what a plain ``open`` / ``mkdir`` would
give under the process's umask (0644 / 0755 with the usual 022), so a group can read finished runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LOCK = ".lock"  # the lock file inside a temporary folder
UNLOCKED_GRACE_S = 60.0  # a sibling without a lock is younger than this only while being created


def hold(path: Path | str, wait: bool = True) -> IO | None:
    """Take an exclusive advisory lock on ``path`` (created if missing) and return the open file
    that holds it (closing it releases the lock); without ``wait``, None when another holds it."""
    fh = open(path, "a+b")  # noqa: SIM115  (the open file is the lock)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        fh.close()
        if wait:
            raise
        return None
    return fh


@dataclass
class Scratch:
    """A temporary folder and the lock its creator holds on it (:func:`scratch_folder`)."""

    path: Path
    lock: IO | None

    @property
    def name(self) -> str:
        return self.path.name

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def release(self) -> None:
        """Drop the lock (the folder stays; :func:`clean_stale` may now remove it)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def scratch_folder(parent: Path, name: str, kind: str = "tmp") -> Scratch:
    """A new hidden folder ``.NAME.KIND-PID-*`` in ``parent``, locked by this process."""
    path = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent))
    return Scratch(path, hold(path / LOCK))


def umask() -> int:
    """The process's umask (read from /proc, which changes nothing; else set and restored)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    return False


def _stale(path: Path, pid: int) -> IO | None | bool:
    """The lock of a dead writer's sibling (taken: the caller removes it), True for an unlocked one
    that is stale by pid and age, False while its writer lives."""
    lock = path / LOCK if path.is_dir() else path
    if lock.exists():
        held = hold(lock, wait=False)
        return held if held is not None else False
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    return age > UNLOCKED_GRACE_S and _pid_dead(pid)


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``) whose
    writer is gone (killed, or the machine lost power, while writing); those whose lock a live
    process holds, here or in another PID namespace, are left alone."""
    target = Path(target)
    removed = []
    for path in sorted(target.parent.glob(f".{target.name}.*-*-*")):
        kind, _, rest = path.name[len(target.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        stale = _stale(path, int(pid))
        if stale is False:
            continue
        try:
            if kind == "old" and not target.exists() and (path / target.name).exists():
                os.replace(path / target.name, target)  # killed mid-swap: the old folder is the only copy
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        finally:
            if stale is not True:
                stale.close()
        removed.append(path)
    return removed


def _finish(path: Path, folder: bool) -> None:
    """Give a temporary file or folder the permissions ``open`` / ``mkdir`` would under the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


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
    tmp = scratch_folder(target.parent, target.name)
    old: Scratch | None = None
    try:
        yield tmp.path
        if replace and target.exists():
            old = scratch_folder(target.parent, target.name, "old")
            os.replace(target, old.path / target.name)
        (tmp.path / LOCK).unlink()
        _finish(tmp.path, folder=True)
        os.replace(tmp.path, target)
        if old is not None:
            shutil.rmtree(old.path, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp.path, ignore_errors=True)
        raise
    finally:
        tmp.release()
        if old is not None:
            old.release()


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary sibling of ``path`` (locked while written), then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        write(Path(tmp))
        _finish(Path(tmp), folder=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return atomic_write(path, write)
