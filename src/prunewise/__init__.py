"""prunewise: post-training pruning of causal language models.

Public API::

    import prunewise as pw
    model, tokenizer, _ = pw.load_model("smollm2-135m")
    cfg = pw.PruneConfig(metric="wanda", sparsity=0.5, nsamples=32, seqlen=512)
    result = pw.prune(model, tokenizer, cfg)          # in place; result.layers, result.sparsity
    print(pw.evaluate(model, tokenizer, "wiki", seqlen=512, max_tokens=16384)["ppl"])
    print(pw.zero_shot(model, tokenizer, "boolq,piqa", limit=200)["average"])   # needs lm-eval
    pw.run_sweep(pw.Sweep(metrics=["wanda", "sparsegpt"], sparsities=[0.5, 0.7]), "sweeps/a")
    pw.write_report("sweeps/a")
"""

__version__ = "0.1.0"

from . import allocation, metrics  # noqa: E402,F401  (register the methods)
from .allocation.planner import Plan  # noqa: E402
from .config import PruneConfig  # noqa: E402
from .engine import PruneResult, prune_model  # noqa: E402
from .errors import ConfigError, PrunewiseError  # noqa: E402
from .evaluate import evaluate, perplexity, zero_shot  # noqa: E402
from .masks import parse_pattern  # noqa: E402
from .models import find_blocks, load_model  # noqa: E402
from .pipeline import plan, prune, run  # noqa: E402
from .record import RunRecord  # noqa: E402
from .registry import ALLOCATORS, METRICS  # noqa: E402
from .report import write_report  # noqa: E402
from .sweep import Sweep, run_sweep  # noqa: E402

__all__ = [
    "ALLOCATORS", "METRICS", "ConfigError", "Plan", "PruneConfig", "PruneResult", "PrunewiseError",
    "evaluate", "find_blocks", "load_model", "parse_pattern", "perplexity", "plan", "prune",
    "prune_model", "run", "RunRecord", "Sweep", "run_sweep", "write_report", "zero_shot",
]
