"""Build a transformers Llama model from our ModelConfig (the only place our names meet HF's)."""

from __future__ import annotations

import torch

from pipeline.model.config import ModelConfig


def llama_config(cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int):
    """Our ModelConfig -> transformers.LlamaConfig (sdpa attention, no KV cache while training)."""
    from transformers import LlamaConfig

    if cfg.vocab_size < 1:
        raise ValueError("ModelConfig.vocab_size is 0: resolve() fills it from the tokenizer first")
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.mlp_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=False,
        attn_implementation="sdpa",
    )


def build_model(
    cfg: ModelConfig,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    partitioned: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A freshly initialized LlamaForCausalLM with parameters in `dtype` (the training precision).

    With `partitioned` it goes through `from_config`, so under a live HfDeepSpeedConfig (ZeRO-3,
    see runtime/engine.py) the weights are created already split across ranks. Without, it is a
    plain full model in this process (export, tests), whatever DeepSpeed state is around.
    Building in bf16/fp16 loses nothing: DeepSpeed casts the parameters to that dtype before it
    makes the fp32 master copies from them, so the masters start from the same 16-bit values.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    hf_cfg = llama_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    if partitioned:
        return AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    return LlamaForCausalLM(hf_cfg).to(dtype)
