"""prunewise: post-training pruning of causal language models.

Public API::

    import prunewise as pw
    model, tokenizer, _ = pw.load_model("smollm2-135m")
    model, tokenizer = pw.load("runs/w70s")                 # a saved run; --format sparse runs on the sparse kernel
    cfg = pw.PruneConfig(metric="wanda", sparsity=0.5, nsamples=32, seqlen=512)
    result = pw.prune(model, tokenizer, cfg)          # in place; result.layers, result.sparsity
    print(pw.evaluate(model, tokenizer, "wiki", seqlen=512, max_tokens=16384)["ppl"])
    print(pw.zero_shot(model, tokenizer, "boolq,piqa", limit=200)["average"])   # needs lm-eval
    pw.run_sweep(pw.Sweep(metrics=["wanda", "sparsegpt"], sparsities=[0.5, 0.7]), "sweeps/a")
    pw.write_report("sweeps/a")
"""

from . import allocation, metrics  # noqa: F401  (register the methods)
from .allocation.planner import Plan
from .config import PruneConfig
from .errors import ConfigError, PrunewiseError
from .evaluation.perplexity import evaluate, perplexity
from .evaluation.zeroshot import zero_shot
from .model.layers import find_blocks
from .model.loading import load, load_model
from .prune.engine import PruneResult, prune_model
from .prune.masks import parse_pattern
from .registry import ALLOCATORS, METRICS
from .report import write_report
from .run.pipeline import plan, prune, run
from .run.record import RunRecord
from .sweep import Sweep, run_sweep
from .version import __version__

__all__ = [
    "ALLOCATORS",
    "METRICS",
    "ConfigError",
    "Plan",
    "PruneConfig",
    "PruneResult",
    "PrunewiseError",
    "evaluate",
    "find_blocks",
    "load",
    "load_model",
    "parse_pattern",
    "perplexity",
    "plan",
    "prune",
    "prune_model",
    "run",
    "RunRecord",
    "Sweep",
    "run_sweep",
    "write_report",
    "zero_shot",
    "__version__",
]
