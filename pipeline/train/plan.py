"""The plan `launch/pretrain.py --check` prints: world size, batch arithmetic, parameter count and a
per-device memory estimate for model states; pure arithmetic, no process group."""

from __future__ import annotations

from pipeline.runtime.engine import ds_config
from pipeline.train.config import PretrainConfig, resolve


def plan(cfg: PretrainConfig, world_size: int) -> str:
    """The resolved plan as text (for `launch/pretrain.py --check`); starts no process group."""
    r = resolve(cfg, world_size)
    d, p = r.derived, r.parallel
    ds_config(batch=r.batch, optim=r.optim, parallel=p, total_steps=r.train.max_steps, world_size=world_size)
    state = state_bytes(d.num_params, p.zero_stage, p.precision, d.dp_size, p.tp_size)
    offload = [k for k in ("offload_optimizer", "offload_params") if getattr(p, k)]
    return "\n".join(
        [
            f"run dir        {r.run_dir}",
            f"world size     {d.world_size} (data parallel {d.dp_size} x tensor parallel {p.tp_size})",
            f"batch          global {r.batch.global_size} = micro {r.batch.micro_size} x dp {d.dp_size} "
            f"x grad accum {d.grad_accum}; {d.tokens_per_step} tokens/step",
            f"model          {d.num_params:,} params, vocab {r.model.vocab_size}, {d.flops_per_token:.3g} FLOPs/token",
            f"parallel       ZeRO-{p.zero_stage}, {p.precision}"
            + (f", {'+'.join(offload)}" if offload else "")
            + (", activation checkpointing" if p.activation_checkpointing else ""),
            f"memory         weights+grads+Adam ~{_human(state)} per device before offload "
            "(activations extra)",
            f"steps          {r.train.max_steps} ({r.train.max_steps * d.tokens_per_step:,} tokens), "
            f"LR {r.optim.schedule} {r.optim.lr:g} -> {r.optim.min_lr:g}, warmup {r.optim.warmup_steps}",
        ]
    )


def _human(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def state_bytes(params: int, zero_stage: int, precision: str, dp: int, tp: int = 1) -> float:
    """Per-device bytes of parameters, gradients and AdamW state under a ZeRO stage (and AutoTP)."""
    params = params / tp  # AutoTP shards the linear layers (embeddings/norms are small at scale)
    half = precision != "fp32"
    weights, grads = (2 if half else 4) * params, (2 if half else 4) * params
    optim = (12 if half else 8) * params  # fp32 master copy (mixed precision) + exp_avg + exp_avg_sq
    optim /= dp if zero_stage >= 1 else 1
    grads /= dp if zero_stage >= 2 else 1
    weights /= dp if zero_stage >= 3 else 1
    return weights + grads + optim
