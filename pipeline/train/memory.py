"""Per-device memory of a training run on a target device, before any hardware is touched (`--check`).

Pure arithmetic on the model's shape and the parallel settings; nothing here imports DeepSpeed.
Four parts, each with its formula (P parameters, N data-parallel ranks, t tensor-parallel size,
L parameters of the largest single module; s sequence length, b micro batch, h hidden size,
h_kv key/value width, f MLP width, V vocabulary, layers l):

- Model states (ZeRO, Rajbhandari et al. 2020), counted as DeepSpeed's own estimator does
  (`estimate_zero3_model_states_mem_needs_all_cold`: 18 bytes per parameter with bf16/fp16): 2 bytes
  of 16-bit weights, 4 of fp32 gradients (the copy the optimizer steps on) and 12 of fp32 master
  weights plus Adam's two moments. ZeRO-1 shards the fp32 part over N, ZeRO-2 as well, ZeRO-3 also
  the weights. fp32 training: 4 weights + 4 gradients + 8 Adam, sharded the same way.
- ZeRO buffers: mixed precision also keeps the 16-bit gradients the ranks reduce into, 2 bytes per
  parameter (DeepSpeed 0.19.8's `grad_partitions_flat_buffer` under ZeRO-3, sharded from ZeRO-2 on),
  which the estimator above leaves out. ZeRO-3 gathers a whole module's weights to use it and holds
  its full gradient before reducing it, 2 x 2 x L bytes (the estimator's 4 L term); plus DeepSpeed's
  default prefetch bucket (5e7 parameters) and reduce bucket (5e8 elements), 16-bit. ZeRO-1/2: the
  reduce and all-gather buckets (5e8 elements each).
- Activations, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", eq. 1-2: s b h (34 + 5 a s / h) bytes per layer for GPT with dropout), redone for Llama:
  no dropout, RMSNorm, SwiGLU and grouped-query attention through SDPA, which keeps no s x s scores.
  Per layer, 16-bit: s b (8 h + (4 h + 4 h_kv + 8 f) / t) bytes (norm inputs and outputs 8 s b h; Q,
  K, V and the attention output; gate, up, SiLU(gate) and their product in the MLP); fp32 doubles it.
  The loss adds s b V x 10 bytes (16-bit logits, the fp32 copy the loss takes, and its log-softmax).
  With activation checkpointing every layer keeps only its input (2 s b h) and one layer is
  recomputed at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.model.config import ModelConfig

GIB = 2**30
PREFETCH_BUCKET = 5e7  # stage3_prefetch_bucket_size default (parameters)
REDUCE_BUCKET = 5e8  # reduce_bucket_size default (elements); ZeRO-1/2 also allgather_bucket_size
USABLE = 0.9  # of a GPU's memory: the CUDA context, NCCL buffers and allocator fragmentation take the rest


@dataclass(frozen=True)
class Device:
    """A training target: memory per device and dense peak TFLOP/s per precision."""

    name: str
    memory_gib: float | None
    """Memory of one device; None for CPUs (the node's RAM)."""
    peak_tflops: dict[str, float]
    """Dense peak by precision; a precision missing here cannot train on it."""
    note: str = ""


DEVICES: dict[str, Device] = {
    "a100-40": Device("NVIDIA A100 40GB", 40, {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    "a100-80": Device("NVIDIA A100 80GB", 80, {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    "h100": Device("NVIDIA H100 80GB (SXM)", 80, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    "h200": Device("NVIDIA H200 141GB", 141, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    "l40s": Device("NVIDIA L40S 48GB", 48, {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    "v100": Device("NVIDIA V100 32GB", 32, {"fp16": 125.0, "fp32": 15.7}, "no bf16 (Volta)"),
    "cpu": Device(
        "CPU",
        None,
        {"bf16": 0.0, "fp32": 0.0},
        "fp16 only on CPUs with AVX512-FP16/AMX-FP16 (Sapphire Rapids+)",
    ),
}


def model_states(params: int, zero_stage: int, precision: str, dp: int, tp: int = 1) -> tuple[float, float]:
    """(model states, 16-bit gradient buffer) bytes per device: weights, fp32 gradients and fp32
    master + Adam as DeepSpeed's estimator counts them, and the 16-bit gradients mixed precision adds."""
    p = params / tp  # AutoTP shards the linear layers (embeddings and norms are small at scale)
    o_shard = dp if zero_stage >= 1 else 1
    g_shard = dp if zero_stage >= 2 else 1
    w_shard = dp if zero_stage >= 3 else 1
    if precision == "fp32":
        return p * (4 / w_shard + 4 / g_shard + 8 / o_shard), 0.0
    return p * (2 / w_shard + (4 + 12) / o_shard), p * 2 / g_shard


def largest_module_params(m: ModelConfig) -> int:
    """Parameters of the largest single module: an embedding/lm_head, an MLP or an attention matrix."""
    head_dim = m.hidden_size // m.num_heads
    return max(
        m.vocab_size * m.hidden_size, m.hidden_size * m.mlp_size, m.hidden_size * m.num_heads * head_dim
    )


def zero_buffers(m: ModelConfig, zero_stage: int, precision: str) -> float:
    """Bytes of ZeRO's gather and bucket buffers on one device (see the module docstring)."""
    c = 4 if precision == "fp32" else 2
    if zero_stage == 3:
        return 2 * c * largest_module_params(m) + c * PREFETCH_BUCKET + c * REDUCE_BUCKET
    return 2 * c * REDUCE_BUCKET if zero_stage in (1, 2) else 0.0


def layer_activations(m: ModelConfig, seq_len: int, micro: int, tp: int, precision: str) -> float:
    """Bytes one decoder layer keeps for backward (Korthikanti et al. 2022, redone for Llama)."""
    h, f = m.hidden_size, m.mlp_size
    h_kv = m.kv_heads * (h // m.num_heads)
    per_token = 8 * h + (4 * h + 4 * h_kv + 8 * f) / tp  # 16-bit bytes
    return seq_len * micro * per_token * (2 if precision == "fp32" else 1)


def activations(
    m: ModelConfig, seq_len: int, micro: int, tp: int, precision: str, checkpointing: bool
) -> float:
    """Bytes of activations of one micro batch on one device, with or without checkpointing."""
    c = 4 if precision == "fp32" else 2
    layer = layer_activations(m, seq_len, micro, tp, precision)
    loss = seq_len * micro * m.vocab_size * (8 if c == 4 else 10)
    if checkpointing:
        return m.num_layers * seq_len * micro * m.hidden_size * c + layer + loss
    return m.num_layers * layer + loss


@dataclass
class MemoryPlan:
    """Bytes per device by part; `total(checkpointing)` is what must fit (the parts summed, which
    errs high: the step's fp32 gradients and the activations are not alive at the same moment)."""

    states: float
    buffers: float
    activations: float
    activations_ckpt: float
    host: float
    """Bytes per device that offload moves to host memory."""

    def total(self, checkpointing: bool) -> float:
        return self.states + self.buffers + (self.activations_ckpt if checkpointing else self.activations)


def estimate(m: ModelConfig, params: int, *, parallel, seq_len: int, micro: int, dp: int) -> MemoryPlan:
    """The memory plan of one device for a resolved model and ParallelConfig."""
    p = parallel
    states, grads16 = model_states(params, p.zero_stage, p.precision, dp, p.tp_size)
    host = 0.0
    if p.offload_optimizer:  # fp32 master, Adam moments and the step's fp32 gradients live on the host
        host = params / p.tp_size / dp * (8 if p.precision == "fp32" else 16)
        states -= host
    if p.offload_params:  # ZeRO-3: the weight partition too
        weights = params / dp * (4 if p.precision == "fp32" else 2)
        host, states = host + weights, states - weights
    args = (m, seq_len, micro, p.tp_size, p.precision)
    return MemoryPlan(
        states=states,
        buffers=grads16 + zero_buffers(m, p.zero_stage, p.precision),
        activations=activations(*args, checkpointing=False),
        activations_ckpt=activations(*args, checkpointing=True),
        host=host,
    )


def human(n: float) -> str:
    """Bytes as GiB (or MiB below one GiB)."""
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 2**20:,.0f} MiB"
