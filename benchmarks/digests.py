"""Mask digests of five fixed runs on the bundled model: the proof that a refactor changed nothing.

    python benchmarks/digests.py [--out digests.json]

Each run: ``--calib wiki --nsamples 4 --seqlen 128 --seed 0`` on smollm2-135m, no evaluation.
Compare the printed SHA-256s before and after a change that should not change any mask.
"""

from __future__ import annotations

import argparse
import json
import sys

from prunewise import PruneConfig, run

RUNS = [
    ("wanda", "owl", 0.7, "unstructured"),
    ("sparsegpt", "uniform", None, "2:4"),
    ("sparsegpt", "uniform", 0.7, "unstructured"),
    ("magnitude", "alphapruning", 0.7, "unstructured"),
    ("gblm", "atp:beta=0.01", 0.6, "unstructured"),
    ("wanda", "mrp", 0.7, "unstructured"),
]
# --all: also the allocator drivers (ATP's beta search, MRP's dynamic rounds) and GBLM's
# block-by-block backward (checkpointing=true).
EXTRA = [
    ("wanda", "atp", 0.7, "unstructured"),
    ("wanda", "mrp:stats=dynamic", 0.7, "unstructured"),
    ("gblm:checkpointing=true", "uniform", 0.5, "unstructured"),
    ("gblm", "uniform", 0.5, "unstructured"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the digests to this JSON file")
    parser.add_argument("--all", action="store_true", help="also the allocator drivers and GBLM's block-wise backward")
    args = parser.parse_args()
    digests = {}
    for metric, allocator, sparsity, pattern in RUNS + (EXTRA if args.all else []):
        config = PruneConfig(
            model="smollm2-135m",
            metric=metric,
            allocator=allocator,
            sparsity=sparsity,
            pattern=pattern,
            calib="wiki",
            nsamples=4,
            seqlen=128,
            seed=0,
        )
        record = run(config, progress=False).record
        name = f"{metric}/{allocator} {pattern if sparsity is None else sparsity}"
        digests[name] = record.mask_sha256
        print(f"{name:<32} {digests[name]}", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(digests, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
