"""AlphaPruning's spectra against the reference code on the same matrices (issue #23's goal: at
least 5x faster).

Every decoder-block linear layer of ``--model`` (SmolLM2-135M: 210 matrices): prunewise's
eigenvalues (:func:`prunewise.allocation.esd.eigenvalues`) and PL_Alpha_Hill fit (``xmin_peak``,
the reference's log10 quirk on, so both compute the same exponents), then, with ``--reference``,
the AlphaPruning reference code's ``net_esd_estimator(blocks, fix_fingers="xmin_peak")`` on the
model's blocks, in the same process. Nothing is cached: both compute every spectrum.

The reference is not vendored: point ``--reference`` at a folder holding its ``lib/esd_utils.py``
(a checkout of haiquanlu/AlphaPruning). That module imports ``weightwatcher`` at the top, which
``net_esd_estimator`` does not use; an empty stand-in module is registered when it is missing.

    python benchmarks/bench_spectra.py --reference ~/src/AlphaPruning --out benchmarks/results/spectra.jsonl

Run it alone on the machine. To time an older prunewise on the same matrices, run this file with
``PYTHONPATH=<that tree>/src``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch


def reference_estimator(root: Path):
    sys.modules.setdefault("weightwatcher", types.ModuleType("weightwatcher"))
    spec = importlib.util.spec_from_file_location("alphapruning_esd_utils", root / "lib" / "esd_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.net_esd_estimator


def main() -> int:
    import prunewise as pw
    from prunewise.allocation.esd import alpha_hill, eigenvalues
    from prunewise.model.blocks import BlockSource
    from prunewise.model.layers import weight_matrix

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--reference", type=Path, help="folder with the AlphaPruning reference code (lib/esd_utils.py)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    model, _, _ = pw.load_model(a.model)
    source = BlockSource(model)
    weights = [weight_matrix(m) for _, _, m in source.all_linears()]
    t0 = time.perf_counter()
    eigs = [eigenvalues(w) for w in weights]
    t1 = time.perf_counter()
    ours = torch.tensor([alpha_hill(e, "xmin_peak", faithful_log10=True) for e in eigs])
    t2 = time.perf_counter()
    row = {
        "model": a.model,
        "matrices": len(weights),
        "threads": torch.get_num_threads(),
        "prunewise": pw.__file__,
        "eigenvalues_s": round(t1 - t0, 2),
        "fit_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2),
        "alpha": {"min": ours.min().item(), "max": ours.max().item(), "mean": ours.mean().item()},
    }
    if a.reference:
        estimator = reference_estimator(a.reference)
        t0 = time.perf_counter()
        ref = torch.tensor(estimator(model.model.layers, fix_fingers="xmin_peak")["alpha"], dtype=torch.float64)
        row["reference_s"] = round(time.perf_counter() - t0, 2)
        row["reference_alpha"] = {"min": ref.min().item(), "max": ref.max().item(), "mean": ref.mean().item()}
        if ref.numel() == ours.numel():
            row["max_rel_alpha_diff"] = ((ours - ref).abs() / ref).max().item()
        row["speedup"] = round(row["reference_s"] / row["total_s"], 2)
    print(json.dumps(row))
    if a.out:
        with a.out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
