"""Parameter count and training FLOPs per token of a ModelConfig, analytically (for MFU and --check)."""

from __future__ import annotations

from pipeline.model.config import ModelConfig


def num_params(cfg: ModelConfig, *, embeddings: bool = True) -> int:
    """Trainable parameters, as LlamaForCausalLM counts them (tied lm_head counted once)."""
    h, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    kv = cfg.kv_heads * head_dim
    attn = h * h * 2 + h * kv * 2  # q, o: (h, h); k, v: (h, kv)
    mlp = 3 * h * cfg.mlp_size  # gate, up, down
    per_layer = attn + mlp + 2 * h  # + two RMSNorm weights
    body = cfg.num_layers * per_layer + h  # + final norm
    if not embeddings:
        return body
    emb = cfg.vocab_size * h
    return body + emb + (0 if cfg.tie_embeddings else emb)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward+backward FLOPs per trained token: 6 x matmul params + causal attention scores.

    The lm_head matmul counts (tied or not); the embedding lookup does not. Attention:
    QK^T and AV are 2 x 2 x seq_len x hidden FLOPs per token and layer forward, x3 for
    forward+backward, halved for the causal mask, i.e. 6 x layers x hidden x seq_len.
    """
    matmul_params = num_params(cfg, embeddings=False) + cfg.vocab_size * cfg.hidden_size
    return 6.0 * matmul_params + 6.0 * cfg.num_layers * cfg.hidden_size * seq_len
