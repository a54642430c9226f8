"""A/B timing of one prunewise command on two source trees, alternating runs, alone on the machine.

    git worktree add /tmp/old <commit>
    python benchmarks/ab.py --a /tmp/old/src --b src --repeat 2 -- prune --model smollm2-135m \\
        --metric wanda --sparsity 0.5 --nsamples 32 --seqlen 512 --eval-data wiki --max-tokens 16384 -q

Each run is a fresh ``python -m prunewise.cli`` with ``PYTHONPATH`` set to the tree; its wall
time and peak RSS (the resource usage ``os.wait4`` returns for that child) are printed per run
and as medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def run_once(src: str, argv: list[str]) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunewise.cli", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{src}: command failed")
    return wall, usage.ru_maxrss / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="first source tree (the folder holding prunewise/)")
    parser.add_argument("--b", required=True, help="second source tree")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the prunewise command")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    results: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
    for i in range(args.repeat):
        for name in ("a", "b") if i % 2 == 0 else ("b", "a"):
            wall, rss = run_once(getattr(args, name), argv)
            results[name].append((wall, rss))
            print(f"run {i + 1} {name}: {wall:.1f} s, peak RSS {rss:.2f} GB", flush=True)
    for name, rows in results.items():
        print(
            f"{name} ({getattr(args, name)}): median {statistics.median(w for w, _ in rows):.1f} s, "
            f"peak RSS {statistics.median(r for _, r in rows):.2f} GB over {len(rows)} runs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
