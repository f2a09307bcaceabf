"""The plan `launch/pretrain.py --check` prints, for this machine or a target (`--device h100
--world-size 64`): world layout, batch arithmetic, parameters, and per-device memory of model states,
ZeRO buffers and activations (with and without activation checkpointing; formulas and sources in
memory.py), and whether that fits. Pure arithmetic: no process group, no GPU, no token shards needed
when the vocabulary is given (`--vocab`, or `--tokenizer` for a tokenizer folder)."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.model.flops import num_params
from pipeline.runtime.engine import ds_config
from pipeline.train.config import PretrainConfig, ResolvedPretrainConfig, resolve
from pipeline.train.memory import DEVICES, USABLE, Device, estimate, human, largest_module_params


def plan(
    cfg: PretrainConfig,
    world_size: int,
    *,
    device: str | None = None,
    vocab: int | None = None,
    tokenizer: Path | None = None,
    gpus_per_node: int = 8,
) -> str:
    """The resolved plan as text; `device` names a DEVICES entry (None: this machine)."""
    target = target_device(device)
    check_precision_on(target, cfg.parallel.precision)
    tok = tokenizer_section(cfg, vocab, tokenizer)
    r = resolve(cfg, world_size, check_device=device is None, tokenizer=tok)
    ds_config(
        batch=r.batch,
        optim=r.optim,
        parallel=r.parallel,
        total_steps=r.train.max_steps,
        world_size=world_size,
        device="cpu" if target.memory_gib is None else "cuda",
    )
    return "\n".join(_layout(r, target, gpus_per_node) + _memory(r, target))


def target_device(device: str | None) -> Device:
    """The DEVICES entry for `device`, or this machine's accelerator (a table entry when it knows it)."""
    if device is not None:
        if device.lower() not in DEVICES:
            raise ConfigError("--device", f"unknown device {device!r}; known: {', '.join(DEVICES)}")
        return DEVICES[device.lower()]
    import torch

    if not torch.cuda.is_available():
        return DEVICES["cpu"]
    name = torch.cuda.get_device_name(0)
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    known = [d for d in DEVICES.values() if d.memory_gib and d.name.split()[1] in name]
    return Device(name, gib, known[0].peak_tflops if known else {"bf16": 0, "fp16": 0, "fp32": 0})


def tokenizer_section(cfg: PretrainConfig, vocab: int | None, tokenizer: Path | None) -> dict | None:
    """The manifest's `tokenizer` section from --vocab or a tokenizer folder; None = read the manifest."""
    if tokenizer is not None:
        from pipeline.data.manifest import tokenizer_info

        return tokenizer_info(tokenizer)
    if vocab is not None:
        if vocab < 1:
            raise ConfigError("--vocab", f"must be >= 1, got {vocab}")
        return {"vocab_size": vocab, "path": "", "fingerprint": "", "bos_id": -1, "eos_id": -1, "pad_id": -1}
    if not (Path(cfg.data.tokens) / "manifest.json").is_file():
        raise ConfigError(
            "data.tokens",
            f"no manifest.json in {cfg.data.tokens} to take the vocabulary from; "
            "to plan without token shards give --vocab N or --tokenizer DIR",
        )
    return None


def check_precision_on(target: Device, precision: str) -> None:
    """ConfigError when the target device cannot train in `precision`."""
    if precision not in target.peak_tflops and not (target.memory_gib is None and precision == "fp16"):
        raise ConfigError(
            "parallel.precision",
            f"{precision} does not train on {target.name} ({target.note or 'no hardware support'}); "
            f"use one of {sorted(target.peak_tflops)}",
        )


def _layout(r: ResolvedPretrainConfig, target: Device, gpus_per_node: int) -> list[str]:
    d, p, b = r.derived, r.parallel, r.batch
    nodes = max(1, -(-d.world_size // gpus_per_node)) if target.memory_gib else 1
    offload = [k for k in ("offload_optimizer", "offload_params") if getattr(p, k)]
    peak = target.peak_tflops.get(p.precision) or 0
    return [
        f"run dir        {r.run_dir}",
        f"target         {target.name}"
        + (f", peak {peak:g} TFLOP/s {p.precision} dense" if peak else "")
        + (f"; {target.note}" if target.note else ""),
        f"world          {d.world_size} ranks"
        + (f" ({nodes} nodes x {min(gpus_per_node, d.world_size)})" if nodes > 1 else "")
        + f" = data parallel {d.dp_size} x tensor parallel {p.tp_size}",
        f"batch          global {b.global_size} = micro {b.micro_size} x dp {d.dp_size} x grad accum "
        f"{d.grad_accum}; {d.tokens_per_step:,} tokens/step of {r.data.seq_len}",
        f"model          {d.num_params:,} params ({num_params(r.model, embeddings=False):,} without "
        f"embeddings), vocab {r.model.vocab_size}, {d.flops_per_token:.3g} FLOPs/token",
        f"parallel       ZeRO-{p.zero_stage}, {p.precision}"
        + (f", {'+'.join(offload)}" if offload else "")
        + (", activation checkpointing" if p.activation_checkpointing else ""),
        f"steps          {r.train.max_steps} ({r.train.max_steps * d.tokens_per_step:,} tokens), "
        f"LR {r.optim.schedule} {r.optim.lr:g} -> {r.optim.min_lr:g}, warmup {r.optim.warmup_steps}",
    ]


def _memory(r: ResolvedPretrainConfig, target: Device) -> list[str]:
    d, p = r.derived, r.parallel
    m = estimate(
        r.model, d.num_params, parallel=p, seq_len=r.data.seq_len, micro=r.batch.micro_size, dp=d.dp_size
    )
    ckpt, other = p.activation_checkpointing, not p.activation_checkpointing
    lines = [
        "memory per device (formulas and sources: pipeline/train/memory.py)",
        f"  model states   {human(m.states):>11}   weights, fp32 gradients, fp32 master + Adam "
        f"(ZeRO-{p.zero_stage} over {d.dp_size} ranks)",
        f"  ZeRO buffers   {human(m.buffers):>11}   "
        + ("16-bit gradient partition, " if p.precision != "fp32" else "")
        + (
            f"largest module gathered with its gradient ({largest_module_params(r.model):,} params), "
            "prefetch + reduce buckets"
            if p.zero_stage == 3
            else "reduce + all-gather buckets"
        ),
        f"  activations    {human(m.activations):>11}   micro {r.batch.micro_size} x seq {r.data.seq_len}, "
        f"{r.model.num_layers} layers + loss over vocab {r.model.vocab_size}",
        f"  with act. ckpt {human(m.activations_ckpt):>11}   layer inputs only, one layer recomputed at a time",
    ]
    if m.host:
        lines.append(f"  host (offload) {human(m.host):>11}   per rank, in CPU memory")
    lines.append(_verdict(m.total(ckpt), target, ckpt) + _alternative(m.total(other), target, other))
    return lines


def _verdict(total: float, target: Device, ckpt: bool) -> str:
    what = f"  total          {human(total):>11}   as configured ({'with' if ckpt else 'no'} activation checkpointing)"
    if target.memory_gib is None:
        return what + ": CPU ranks share the node's RAM"
    usable = target.memory_gib * 2**30 * USABLE
    verdict = "fits" if total <= usable else "DOES NOT FIT"
    return what + f": {verdict} in {human(usable)} usable of {target.memory_gib:g} GB"


def _alternative(total: float, target: Device, ckpt: bool) -> str:
    if target.memory_gib is None:
        return ""
    fits = total <= target.memory_gib * 2**30 * USABLE
    return f"; {'with' if ckpt else 'without'} it {human(total)} ({'fits' if fits else 'does not fit'})"
