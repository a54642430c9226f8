"""Documents of the ``wiki_cloze`` task, built from the bundled Wikipedia test split.

Sentences of 12 to 40 words are cut after half their words; the model sees the previous
sentence of the same article (when there is one) and the first half, and chooses among the true
second half and the second halves of three other sentences whose halves have nearly the same
number of words (so length alone does not give the answer away), taken from the same article
when it has enough of them (so the topic alone does not either), else from any article.
Deterministic: seed 0, at most ``size`` examples (default 400).
"""

from __future__ import annotations

import random
import re

from prunewise.data import wiki_splits  # absolute: lm-eval loads this file by its path


def documents(size: int = 400, seed: int = 0) -> list[dict]:
    _, test = wiki_splits()
    items = []  # (previous sentence, first half, second half, article)
    for a, article in enumerate(test.split("\n\n")):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", article.strip()) if s]
        for prev, sent in zip([""] + sentences[:-1], sentences):
            words = sent.split()
            if 12 <= len(words) <= 40:
                cut = len(words) // 2
                items.append((prev, " ".join(words[:cut]), " ".join(words[cut:]), a))
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    docs = []
    for i in order[:size]:
        prev, first, second, article = items[i]
        n = len(second.split())
        pool = [
            j for j in range(len(items)) if j != i and abs(len(items[j][2].split()) - n) <= 2 and items[j][2] != second
        ]
        same = [j for j in pool if items[j][3] == article]
        pool = same if len(same) >= 3 else pool
        if len(pool) < 3:
            continue
        choices = [items[j][2] for j in rng.sample(pool, 3)]
        label = rng.randrange(4)
        choices.insert(label, second)
        docs.append({"context": (prev + " " + first).strip(), "choices": choices, "label": label})
    return docs


def load(**kwargs):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(documents())})
