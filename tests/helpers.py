"""What tests import: tiny random-init models of four architectures, a tiny word-level tokenizer,
generated text, and the last decoder block's output of a full forward pass."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MixtralConfig, OPTConfig, Qwen2Config

from prunewise.config import PruneConfig
from prunewise.model.layers import find_blocks

DATA = Path(__file__).parent / "data"  # task folders and files the tests read

VOCAB = 192
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if more no out "
    "so said what up its about into than them can only other new some could time these two may then "
    "do first any my now such like our over man me even most made after also did many before must"
).split()


def tiny_config(arch: str, vocab: int = VOCAB, layers: int = 3):
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
        )
    if arch == "qwen2":  # grouped-query attention: 4 query heads, 2 key-value heads
        return Qwen2Config(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
        )
    raise ValueError(arch)


def tiny_mixtral_config(vocab: int = VOCAB, layers: int = 2) -> MixtralConfig:
    """A tiny Mixtral: 4 experts, 2 routed per token (the MoE case of the families and sparse tests)."""
    return MixtralConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )


ARCHS = ("llama", "qwen2", "opt", "gpt2")
LINEARS_PER_BLOCK = {"llama": 7, "qwen2": 7, "opt": 6, "gpt2": 4}


def tiny_model(arch: str, seed: int = 0, vocab: int = VOCAB, layers: int = 3):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, layers), attn_implementation="eager").eval()
    # Random init is near-Gaussian; spread the weight scales so metrics disagree visibly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape[1]) * 4 + 0.1)
    model.config.use_cache = False
    return model


def make_text(n_words: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        k = rng.randint(5, 14)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        words += k
    paragraphs = [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)]
    return "\n\n".join(paragraphs)


def make_tokenizer():
    """A word-level fast tokenizer over WORDS (+ punctuation), small enough for tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, ".": 2}
    for w in WORDS:
        for form in (w, w.capitalize()):
            vocab.setdefault(form, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")
    return fast


def last_block_output(model, ids):
    """The last decoder block's output in one full forward pass (what replay must reproduce)."""
    _, blocks = find_blocks(model)
    grabbed = []
    handle = blocks[-1].register_forward_hook(lambda m, a, o: grabbed.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return grabbed[0]


def sharded_checkpoint(
    folder: Path, *, layers: int = 4, max_shard_bytes: int = 200_000, tied: bool = False, seed: int = 0
) -> Path:
    """A random-init LLaMA of hidden width 64 written shard by shard (``random_checkpoint``), with
    the tiny tokenizer: the hostile-case probes' ``m/sh4`` (4 layers, several shards, untied head)."""
    from prunewise.model.streaming import random_checkpoint

    tok = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    return random_checkpoint(folder, config, tokenizer=tok, max_shard_bytes=max_shard_bytes, seed=seed)


def run_config(model_dir, text, **fields) -> PruneConfig:
    """A quick run of a tiny model folder: 4 x 16 calibration tokens and 320 evaluation tokens
    (windows of 16) from the file ``text``; ``fields`` set or override the rest."""
    base = dict(
        model=str(model_dir),
        calib=f"file:{text}",
        nsamples=4,
        seqlen=16,
        eval_data=f"file:{text}",
        eval_seqlen=16,
        max_tokens=320,
    )
    return PruneConfig(**{**base, **fields})
