"""GGUF export (pipeline/deploy/gguf.py), checked by clients we did not write: transformers' GGUF
loader must reproduce the source model's logits, and the gguf package's reader must see our
vocabulary, special tokens and chat template. The rope permutation is checked against the two
rotary conventions themselves."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from finetune_helpers import ft_init  # noqa: F401

from pipeline.deploy.gguf import GGUF_TOL, export_gguf, rope_permute, tensor_type
from pipeline.errors import CheckpointError, ConfigError, DataError


def rope_half(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """HF Llama rotary: dims i and i + d/2 rotate together. x: (T, d)."""
    d = x.shape[-1]
    angle = pos[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (T, d/2)
    x1, x2 = x[:, : d // 2], x[:, d // 2 :]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


def rope_pairs(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """llama.cpp's `llama` rotary: dims 2i and 2i+1 rotate together. x: (T, d)."""
    d = x.shape[-1]
    angle = pos[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = a * angle.cos() - b * angle.sin()
    out[:, 1::2] = b * angle.cos() + a * angle.sin()
    return out


@pytest.mark.parametrize(("n_head", "head_dim"), [(4, 16), (2, 8), (1, 64)])
def test_permuted_projection_under_pair_rope_equals_half_rope(n_head, head_dim):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n_head * head_dim, 32, generator=g, dtype=torch.float64)
    x = torch.randn(5, 32, generator=g, dtype=torch.float64)
    pos = torch.arange(5, dtype=torch.float64) * 3
    w_gguf = torch.from_numpy(rope_permute(w.numpy(), n_head))
    for h in range(n_head):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        hf = rope_half(x @ w[rows].T, pos)  # what transformers computes for head h
        cpp = rope_pairs(x @ w_gguf[rows].T, pos)  # what llama.cpp computes from the file
        back = torch.empty_like(cpp)
        back[:, : head_dim // 2], back[:, head_dim // 2 :] = cpp[:, 0::2], cpp[:, 1::2]
        torch.testing.assert_close(back, hf)


def test_tensor_types_keep_norms_f32_and_fall_back_when_rows_do_not_fit_blocks():
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0").name == "F32"
    assert tensor_type("blk.0.ffn_down.weight", (64, 192), "q4_0").name == "Q4_0"
    assert tensor_type("blk.0.ffn_down.weight", (64, 100), "q8_0").name == "F16"  # 100 % 32 != 0
    assert tensor_type("token_embd.weight", (1000, 64), "q4_1").name == "Q8_0"
    assert tensor_type("token_embd.weight", (1000, 64), "bf16").name == "BF16"


@torch.no_grad()
def gguf_logits_diff(folder, gguf_path, ids):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    want, have = ref(input_ids=ids).logits, got.eval()(input_ids=ids).logits
    return got.config, float((have - want).abs().max()), max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("gtype", ["f32", "q8_0"])
def test_transformers_loads_export_with_logits_in_tolerance(ft_init, tmp_path, gtype):  # noqa: F811
    from transformers import AutoTokenizer

    out = tmp_path / f"m-{gtype}.gguf"
    report = export_gguf(ft_init, out, gtype)
    assert out.is_file() and report["bytes"] == out.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    tok = AutoTokenizer.from_pretrained(ft_init)
    ids = torch.tensor(
        [tok.encode("The json module encodes Python objects. 数据处理", add_special_tokens=False)]
    )
    config, diff, scale = gguf_logits_diff(ft_init, out, ids)
    assert diff <= GGUF_TOL[gtype] * scale, (gtype, diff)
    src = json.loads((ft_init / "config.json").read_text())
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)  # GQA survives
    assert config.tie_word_embeddings and config.rms_norm_eps == pytest.approx(src["rms_norm_eps"])


def test_vocab_specials_and_chat_template_in_the_file(ft_init, tmp_path):  # noqa: F811
    from gguf import GGUFReader
    from sentencepiece import SentencePieceProcessor
    from transformers import AutoTokenizer

    out = tmp_path / "m.gguf"
    export_gguf(ft_init, out, "f16", verify=False)
    fields = GGUFReader(out).fields
    sp = SentencePieceProcessor(model_file=str(ft_init / "tokenizer.model"))
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    scores = fields["tokenizer.ggml.scores"].contents()
    assert np.allclose(scores, [sp.get_score(i) for i in range(len(tokens))])
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[sp.unk_id()] == 2 and types[sp.bos_id()] == 3 and types[tokens.index("<|user|>")] == 4
    assert types[tokens.index("<0x0A>")] == 6  # byte fallback pieces
    for key, want in [("bos", sp.bos_id()), ("eos", sp.eos_id()), ("padding", sp.pad_id())]:
        assert fields[f"tokenizer.ggml.{key}_token_id"].contents() == want
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False
    ours = AutoTokenizer.from_pretrained(ft_init)
    assert fields["tokenizer.chat_template"].contents() == ours.chat_template
    # transformers rebuilds a tokenizer from the file: same ids for our pieces, same chat encoding
    theirs = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert all(theirs.convert_tokens_to_ids(p) == i for i, p in enumerate(tokens))
    chat = [{"role": "user", "content": "用一句话解释 json 模块。"}]
    assert theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    )
    text = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(("heads", "kv_heads", "vocab"), [(4, 4, 1000), (8, 1, 1024)])
def test_untied_head_other_head_layouts_and_padded_vocab(ft_init, tmp_path, heads, kv_heads, vocab):  # noqa: F811
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "src"
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
        rope_theta=50000.0, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(ft_init / name, folder / name)
    out = tmp_path / "u.gguf"
    report = export_gguf(folder, out, "q8_0")
    assert report["tensor_types"] == {"Q8_0": 14, "F32": 5, "F16": 2}  # ffn_down rows are 80 wide
    config, diff, scale = gguf_logits_diff(folder, out, torch.arange(40).view(2, 20) * 13 % vocab)
    assert not config.tie_word_embeddings and config.rope_parameters["rope_theta"] == pytest.approx(50000.0)
    assert diff <= GGUF_TOL["q8_0"] * scale
    types = GGUFReader(out).fields["tokenizer.ggml.token_type"].contents()
    assert len(types) == vocab and set(types[1000:]) <= {5}  # embedding rows past the tokenizer: unused


def test_bad_inputs_raise_and_leave_no_file(ft_init, tmp_path, monkeypatch):  # noqa: F811
    with pytest.raises(ConfigError, match="llama-quantize"):
        export_gguf(ft_init, tmp_path / "x.gguf", "q4_k_m")
    with pytest.raises(DataError, match="neither a Hugging Face folder"):
        export_gguf(tmp_path, tmp_path / "x.gguf", "f16")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(ft_init / name, no_tok / name)
    with pytest.raises(DataError, match="tokenizer.model"):
        export_gguf(no_tok, tmp_path / "x.gguf", "f16")
    biased = tmp_path / "biased"
    biased.mkdir()
    cfg = json.loads((ft_init / "config.json").read_text())
    (biased / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    with pytest.raises(DataError, match="attention_bias"):
        export_gguf(biased, tmp_path / "x.gguf", "f16")
    monkeypatch.setitem(GGUF_TOL, "q4_0", 0.0)  # any rounding now fails the reload check
    with pytest.raises(CheckpointError, match="file not written"):
        export_gguf(ft_init, tmp_path / "x.gguf", "q4_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["biased", "no_tok"]
