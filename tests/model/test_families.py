"""The model families people prune, as tiny random-init models built from configs in the test:
replay equals the full forward; every metric with a data-free (AlphaPruning) and a data-driven
(OWL) allocator prunes to exact counts; the output reloads in plain transformers with the same
masks; the cache fingerprint works. Mixture-of-experts families: each expert's projections are
layers of their block, the router is never pruned, an expert without tokens falls back to
magnitude."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import prunewise as pw
from helpers import VOCAB, last_block_output, tiny_mixtral_config
from prunewise.model.blocks import BlockSource
from prunewise.model.experts import ExpertLinear
from prunewise.model.layers import find_blocks
from prunewise.model.sources import replay
from prunewise.model.streaming import model_fingerprint
from prunewise.prune.masks import target_count
from prunewise.run.saving import mask_digest

SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
MOE = dict(moe_intermediate_size=16, num_experts_per_tok=2)

FAMILIES = {
    "llama3": lambda: transformers.LlamaConfig(
        **SMALL,
        intermediate_size=48,
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": lambda: transformers.MistralConfig(
        **SMALL, intermediate_size=48, num_key_value_heads=2, sliding_window=8
    ),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, intermediate_size=48, num_key_value_heads=2),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, intermediate_size=48, num_key_value_heads=2, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(
        **SMALL,
        intermediate_size=48,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=8,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **SMALL,
        intermediate_size=48,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi3": lambda: transformers.Phi3Config(**SMALL, intermediate_size=48, num_key_value_heads=2, pad_token_id=0),
    "olmo2": lambda: transformers.Olmo2Config(**SMALL, intermediate_size=48, num_key_value_heads=2, pad_token_id=0),
    "falcon": lambda: transformers.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        new_decoder_architecture=True,
        num_kv_heads=2,
        max_position_embeddings=64,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL, intermediate_size=48),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    ),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "mixtral": tiny_mixtral_config,
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **SMALL, intermediate_size=48, num_key_value_heads=2, **MOE, num_experts=4, shared_expert_intermediate_size=24
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **SMALL, intermediate_size=48, num_key_value_heads=2, **MOE, num_experts=4, head_dim=8
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **SMALL,
        intermediate_size=48,
        num_key_value_heads=4,
        **MOE,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_group=2,
        topk_group=1,
    ),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation="eager").eval()
    with torch.no_grad():  # spread the scales (random init is near-Gaussian), as conftest's tiny models do
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(torch.rand(p.shape[-1]) * 4 + 0.1)
    model.config.use_cache = False
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_replay_equals_the_full_forward(family, ids):
    model = build(family)
    assert torch.allclose(replay(model, ids, batch_size=3), last_block_output(model, ids), atol=1e-4, rtol=1e-4)
    model.register_buffer("scalar", torch.tensor(2.0))  # 0-dim tensors, as Gemma 3 holds, fingerprint too
    assert len(model_fingerprint(model)) == 64


@pytest.mark.parametrize("allocator", ["alphapruning", "owl:m=2"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_metric_prunes_to_exact_counts(family, allocator, ids, tmp_path):
    dense = build(family)
    for metric in ("magnitude", "wanda", "sparsegpt", "gblm"):
        model = build(family)
        cfg = pw.PruneConfig(model="x", metric=metric, allocator=allocator, sparsity=0.5, nsamples=4, seqlen=24)
        result = pw.prune(model, None, cfg, calib=ids, cache_dir=tmp_path, progress=False)
        assert result.sparsity == pytest.approx(0.5, abs=1e-3), (family, metric)
        for layer in result.layers:
            assert layer.zeros == target_count(layer.target, layer.numel), (family, metric, layer.name)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out)
    assert mask_digest(again) == mask_digest(model) != mask_digest(dense)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_are_layers_and_the_router_is_never_pruned(family, ids, tmp_path):
    model = build(family)
    source = BlockSource(model)
    layers = {name: m for _, name, m in source.all_linears()}
    experts = [n for n, m in layers.items() if isinstance(m, ExpertLinear)]
    moe_blocks = {i for i, n, m in source.all_linears() if isinstance(m, ExpertLinear)}
    assert len(experts) == 2 * 4 * len(moe_blocks) and moe_blocks
    assert not [n for n in layers if n.endswith((".gate", ".shared_expert_gate", ".router"))]
    routers = {
        n: p.clone()
        for n, p in model.named_parameters()
        if n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
    }
    assert routers
    cfg = pw.PruneConfig(model="x", metric="wanda", sparsity=0.5, nsamples=4, seqlen=24)
    pw.prune(model, None, cfg, calib=ids, cache_dir=tmp_path, progress=False)
    for n, p in model.named_parameters():
        if n in routers:
            assert torch.equal(p, routers[n]), n
    fused = model.get_submodule(experts[0].rsplit(".", 2)[0])
    zeros = (fused.gate_up_proj == 0).flatten(1).sum(1)
    assert zeros.tolist() == [fused.gate_up_proj[0].numel() // 2] * fused.gate_up_proj.shape[0]


def test_each_expert_sees_only_its_routed_tokens(ids):
    """Wanda on an expert uses the norms of the tokens routed to it: equal to a hand computation
    from the router's choices."""
    from prunewise.prune.engine import StatsCollector
    from prunewise.prune.stats import make_stats

    model = build("mixtral")
    source = BlockSource(model)
    inputs = source.capture(ids, 4)
    with torch.no_grad(), source.block(0) as block:
        linears = source.linears(0, block)
        stats = {n: make_stats(("input_norm",), m.weight.shape[1]) for n, m in linears}
        StatsCollector(stats, None).run(block, linears, inputs.hidden, inputs.calls[0])
        moe = block.mlp
        h = block.post_attention_layernorm(
            block.self_attn(block.input_layernorm(inputs.hidden[0]), **inputs.calls[0][0].kwargs)[0] + inputs.hidden[0]
        )
        flat = h.reshape(-1, h.shape[-1])
        _, _, top_k_index = moe.gate(flat)
    for e in range(4):
        routed = flat[(top_k_index == e).any(-1)]
        name = f"{source.path}.0.mlp.experts.gate_up.{e}"
        assert stats[name].ntokens == routed.shape[0]
        if routed.shape[0]:
            assert torch.allclose(stats[name].input_norm(), routed.float().norm(dim=0), rtol=1e-4, atol=1e-5)


def test_an_expert_without_tokens_is_pruned_by_magnitude(ids, tmp_path, caplog):
    def to_experts_0_and_1(hidden):  # a router that never picks experts 2 and 3
        n = hidden.shape[0]
        return torch.zeros(n, 4), torch.full((n, 2), 0.5), torch.tensor([[0, 1]]).expand(n, 2)

    def routed_to_two(model):
        for block in find_blocks(model)[1]:
            block.mlp.gate.forward = to_experts_0_and_1
        return model

    model = routed_to_two(build("mixtral"))
    cfg = pw.PruneConfig(model="x", metric="wanda", sparsity=0.5, nsamples=4, seqlen=24)
    for mode in ("two-pass", "single-pass"):
        m = routed_to_two(build("mixtral"))
        result = pw.prune(m, None, cfg.replace(mode=mode), calib=ids, cache_dir=tmp_path, progress=False)
        assert result.sparsity == pytest.approx(0.5)
        for proj in ("gate_up_proj", "down_proj"):  # kept: the largest |W| of the whole matrix
            orig = getattr(model.model.layers[0].mlp.experts, proj)[3].abs()
            kept = getattr(m.model.layers[0].mlp.experts, proj)[3] != 0
            assert orig[kept].min() >= orig[~kept].max() and int(kept.sum()) == orig.numel() // 2
    assert "mlp.experts.gate_up.3: no calibration token was routed to this expert; pruned by magnitude" in caplog.text
    plan = pw.plan(model, cfg.replace(allocator="owl:m=2", sparsity=0.6), tmp_path, calib=ids, progress=False)
    assert len(plan.allocation) == len(list(BlockSource(model).all_linears()))
    assert "its input norms are taken as ones" in caplog.text
