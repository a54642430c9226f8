"""All-or-nothing writes: a temporary sibling is removed only when no live process holds it, on
any host or in any PID namespace (issue 22 case 1), and finished files and folders get the
permissions the umask gives (case 10)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from prunewise.storage.atomic import atomic_folder, atomic_write_text, clean_stale, hold, scratch_folder


def test_a_held_scratch_folder_is_never_removed_and_a_released_one_is(tmp_path):
    target = tmp_path / "prunewise-stream"
    live = scratch_folder(tmp_path, "prunewise-stream")
    assert live.name.startswith(".prunewise-stream.tmp-") and live.is_dir()
    assert clean_stale(target) == [] and live.is_dir()  # held by this process
    live.release()
    assert clean_stale(target) == [live.path] and not live.path.exists()


def test_the_lock_not_the_pid_decides(tmp_path):
    """A scratch folder whose name carries a pid that is dead here (another namespace's, another
    host's) but whose lock another process holds stays; the pid of a live local process does not
    keep an unheld folder."""
    target = tmp_path / "prunewise-stream"
    code = (
        "import sys, time; from pathlib import Path; from prunewise.storage.atomic import scratch_folder; "
        "s = scratch_folder(Path(sys.argv[1]), 'prunewise-stream'); print(s.path, flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        held = holder.stdout.readline().strip()
        renamed = tmp_path / ".prunewise-stream.tmp-999999999-other"  # a pid no process here has
        os.rename(held, renamed)
        unheld = tmp_path / f".prunewise-stream.tmp-{os.getpid()}-mine"  # a live pid, no holder
        unheld.mkdir()
        (unheld / ".lock").touch()
        removed = clean_stale(target)
        assert renamed.is_dir() and removed == [unheld]
    finally:
        holder.kill()
        holder.wait()
    assert clean_stale(target) == [renamed]


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_a_run_in_another_pid_namespace_keeps_its_scratch(tmp_path):
    """Issue 22 case 1: a run in another PID namespace (another container) shares the folder; its pid
    names no process here, and its scratch folder stays for as long as it runs."""
    code = (
        "import sys; from pathlib import Path; from prunewise.storage.atomic import scratch_folder; "
        "s = scratch_folder(Path(sys.argv[1]), 'prunewise-stream'); print(s.path, flush=True); sys.stdin.read()"
    )
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid is not allowed here: {probe.stderr.decode()[:100]}")
    other = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        held = tmp_path / os.path.basename(other.stdout.readline().strip())
        assert held.name.startswith(".prunewise-stream.tmp-") and held.is_dir()
        assert clean_stale(tmp_path / "prunewise-stream") == [] and held.is_dir()  # its pid means nothing here
    finally:
        other.stdin.close()  # the run ends
        other.wait(timeout=30)
    assert clean_stale(tmp_path / "prunewise-stream") == [held]


def test_finished_files_and_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "run") as tmp:
            (tmp / "x").write_text("x")
        atomic_write_text(tmp_path / "rec.json", "{}")
        assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "rec.json").stat().st_mode & 0o777 == 0o644
        assert not (tmp_path / "run" / ".lock").exists()
        os.umask(0o002)
        with atomic_folder(tmp_path / "run2") as tmp:
            pass
        assert (tmp_path / "run2").stat().st_mode & 0o777 == 0o775
    finally:
        os.umask(old)


def test_hold_is_exclusive_across_processes(tmp_path):
    lock = tmp_path / ".lock"
    mine = hold(lock)
    code = (
        "import sys; from prunewise.storage.atomic import hold; "
        "sys.exit(0 if hold(sys.argv[1], wait=False) is None else 1)"
    )
    assert subprocess.run([sys.executable, "-c", code, str(lock)]).returncode == 0  # held: not taken
    mine.close()
    assert subprocess.run([sys.executable, "-c", code, str(lock)]).returncode == 1
