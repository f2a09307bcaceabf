"""ModelConfig: the Llama-family architecture in our own names (`configs/model/*.yaml`).

Pure data: importing this module does not import transformers. `pipeline/model/build.py`
turns it into a `transformers.LlamaConfig` in one function.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 0
    """Embedding rows; 0 = take it from the tokenizer recorded in the token manifest."""
    hidden_size: int = 64
    """Width of the residual stream (d_model)."""
    intermediate_size: int = 0
    """Width of the SwiGLU MLP; 0 = 8/3 x hidden_size rounded up to a multiple of 64."""
    num_layers: int = 2
    num_heads: int = 4
    """Query heads; hidden_size must be divisible by it."""
    num_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 = num_heads (plain multi-head attention)."""
    max_seq_len: int = 128
    """Longest sequence the model is built for (position embeddings); >= data.seq_len."""
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    """Share the input embedding with the output projection (lm_head)."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights."""

    def validate(self) -> None:
        positive = ("hidden_size", "num_layers", "num_heads", "max_seq_len")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("vocab_size", "intermediate_size", "num_kv_heads"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0 (0 = derived), got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                "num_heads", f"must divide hidden_size ({self.hidden_size}), got {self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                "num_heads", f"head dim {self.hidden_size // self.num_heads} must be even (RoPE)"
            )
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "num_kv_heads", f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}"
            )
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("rope_theta", "rope_theta, rms_norm_eps and init_std must be > 0")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        return -(-(8 * self.hidden_size // 3) // 64) * 64  # ceil to a multiple of 64
