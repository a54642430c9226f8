"""Run llm-compressor's Wanda / SparseGPT modifier on the same model and calibration tokens.

Runs in llm-compressor's own virtual environment (it pins its own transformers), e.g.:
    python -m venv /opt/llmc && /opt/llmc/bin/pip install torch==2.13.0 && \
        /opt/llmc/bin/pip install llmcompressor==0.14.0.1
    /opt/llmc/bin/python benchmarks/llmc_run.py MODEL_DIR CALIB.pt wanda 0.5 0:0 OUT_DIR
Prints one JSON line: wall time of the oneshot call, peak RSS right after it, and the time of
saving the pruned model afterwards (kept out of the wall time, as prunewise's runs are timed).
"""

import json
import resource
import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.obcq import SparseGPTModifier
from llmcompressor.modifiers.pruning import WandaPruningModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    model_dir, calib_path, method, sparsity, structure, out = sys.argv[1:7]
    ids = torch.load(calib_path)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    modifier = cls(
        sparsity=float(sparsity),
        mask_structure=structure,
        targets=[r"re:model\.layers\.\d+\..*_proj$"],
        ignore=["lm_head"],
    )
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=modifier,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
        pipeline="sequential",
        batch_size=1,
    )
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    t0 = time.perf_counter()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    print(json.dumps({"wall_s": wall, "peak_rss_gb": rss, "save_s": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
