"""Streamed GGUF conversion against transformers' whole-model load, on a bundled model (issue #23).

    python benchmarks/bench_convert.py qwen2.5-coder-1.5b [--out benchmarks/results/convert.jsonl]

Each way runs in its own child process (peak RSS from getrusage of the child, wall time): the
streamed conversion writes an fp32 folder; transformers' load dequantizes the whole model and
``save_pretrained`` writes it. Then every tensor of the two folders is compared bit for bit.
Run it alone on the machine: the times are only meaningful then.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STREAMED = """
import sys, torch
from pathlib import Path
from prunewise.model.assets import BUNDLED
from prunewise.model.conversion import convert_gguf
b = BUNDLED[sys.argv[1]]
gguf = b.gguf(b.files(), Path(sys.argv[2]))
convert_gguf(gguf, Path(sys.argv[3]), progress=False)
"""
WHOLE = """
import sys, torch
from pathlib import Path
from prunewise.model.loading import _load_gguf
model, tok = _load_gguf(Path(sys.argv[1]), torch.float32)
model.save_pretrained(sys.argv[2]); tok.save_pretrained(sys.argv[2])
"""


def child(code: str, *args: str) -> dict:
    """Run ``code`` in a child process; its own wall time and peak RSS (``wait4``'s rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"child failed ({status})")
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a bundled model name")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/convert.jsonl"))
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        streamed = child(STREAMED, args.name, str(tmp), str(tmp / "streamed"))
        gguf = next(tmp.glob("*.gguf"), None)
        if gguf is None:  # one whole file in its package
            from prunewise.model.assets import BUNDLED

            gguf = BUNDLED[args.name].files()[0]
        whole = child(WHOLE, str(gguf), str(tmp / "whole"))
        differ, count = [], 0
        mine = {}
        for f in sorted((tmp / "streamed").glob("*.safetensors")):
            mine.update(load_file(f))
        for f in sorted((tmp / "whole").glob("*.safetensors")):
            for k, v in load_file(f).items():
                count += 1
                a = mine.pop(k, None)
                if a is None or not torch.equal(a.view(torch.int32), v.view(torch.int32)):
                    differ.append(k)
        row = {
            "model": args.name,
            "streamed": streamed,
            "transformers": whole,
            "tensors": count,
            "bit_identical": not differ and not mine,
            "differ": differ[:5],
            "only_streamed": sorted(mine)[:5],
        }
    print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
