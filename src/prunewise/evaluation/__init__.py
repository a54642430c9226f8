"""Evaluation: perplexity over the block loop (:mod:`.perplexity`), zero-shot accuracy through
lm-eval (:mod:`.zeroshot`, with prunewise's own offline tasks in ``tasks/``), and inference speed
(:mod:`.speed`)."""
