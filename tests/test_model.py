"""ModelConfig checks, the mapping to LlamaConfig, and analytic parameter counts against real HF models."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.model.build import build_model, llama_config
from pipeline.model.config import ModelConfig
from pipeline.model.flops import flops_per_token, num_params

TINY = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"


def small(**kw) -> ModelConfig:
    return replace(
        ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16), **kw
    )


def test_tiny_yaml_loads():
    cfg = load_config(ModelConfig, TINY)
    assert cfg.vocab_size == 0 and cfg.num_layers == 2 and cfg.kv_heads == 2


@pytest.mark.parametrize(
    ("override", "key"),
    [("num_heads=3", "num_heads"), ("num_kv_heads=3", "num_kv_heads"), ("hidden_size=0", "hidden_size")],
)
def test_invalid_fields_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(ModelConfig, TINY, [override])
    assert err.value.key == key


def test_llama_config_mapping():
    hf = llama_config(small(num_kv_heads=2, tie_embeddings=False), bos_id=2, eos_id=3, pad_id=0)
    assert (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers) == (97, 32, 2)
    assert (hf.num_attention_heads, hf.num_key_value_heads) == (4, 2)
    assert hf.intermediate_size == 128  # 8/3 x 32 = 85 -> next multiple of 64
    assert not hf.tie_word_embeddings and hf.use_cache is False
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (2, 3, 0)


def test_vocab_zero_is_refused_at_build():
    with pytest.raises(ValueError, match="vocab_size"):
        llama_config(small(vocab_size=0), bos_id=2, eos_id=3, pad_id=0)


@pytest.mark.parametrize("kw", [{}, {"num_kv_heads": 2}, {"tie_embeddings": False, "intermediate_size": 48}])
def test_num_params_matches_transformers(kw):
    cfg = small(**kw)
    model = build_model(cfg, bos_id=2, eos_id=3, pad_id=0, partitioned=False)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    assert model(input_ids=ids).logits.shape == (2, 8, cfg.vocab_size)


def test_flops_per_token():
    cfg = small()
    matmul = num_params(cfg, embeddings=False) + 97 * 32
    assert flops_per_token(cfg, 16) == 6 * matmul + 6 * 2 * 32 * 16
