"""Config sections every training run shares: run, batch, optimizer, parallelism and the loop's settings.

Pretraining (`pipeline/train/config.py`) and fine-tuning (`pipeline/finetune/config.py`) both
build their run config from these sections, so DeepSpeed settings come from one place
(`pipeline/runtime/engine.py` turns them into DeepSpeed's config dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.errors import ConfigError


@dataclass
class BatchConfig:
    global_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks and micro batches."""
    micro_size: int = 2
    """Sequences per forward/backward on one rank."""

    def validate(self) -> None:
        for key in ("global_size", "micro_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")

    def grad_accum(self, dp_size: int) -> int:
        """Micro batches per optimizer step on each rank; ConfigError when it does not divide."""
        per_pass = self.micro_size * dp_size
        if self.global_size % per_pass:
            raise ConfigError(
                "batch.global_size",
                f"must be divisible by micro_size x data-parallel size "
                f"({self.micro_size} x {dp_size} = {per_pass}), got {self.global_size}",
            )
        return self.global_size // per_pass


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay; never applied to norms and biases."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 10
    """Linear warmup from lr/warmup_steps to lr over this many optimizer steps."""
    warmup_fraction: float | None = None
    """Warmup as a share of the schedule's steps (`schedule_steps`, else the run's max_steps), e.g. 0.1;
    replaces `warmup_steps` when set, so a short run and a long one warm up alike. None = warmup_steps."""
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """Decay from lr to min_lr over the steps after warmup; `wsd` (warmup-stable-decay) holds lr and
    decays linearly over the last `decay_fraction` of the schedule."""
    decay_fraction: float = 0.2
    """For `wsd`: the share of the post-warmup steps spent decaying (the rest stays at lr)."""
    schedule_steps: int = 0
    """Steps the schedule spans (min_lr from then on); 0 = the run's max_steps. Fix it to extend a
    run (raise max_steps and resume) without changing the LR of steps already planned."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""
    adam: Literal["torch", "deepspeed"] = "torch"
    """AdamW kernel: `torch` (fused on CUDA, foreach on CPU; nothing to compile) or `deepspeed`
    (FusedAdam on GPUs, CPU Adam on CPUs; compiled at first use, needs nvcc or a C++ compiler).
    ZeRO-Offload (parallel.offload_optimizer) always steps with DeepSpeed's CPU Adam."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        for key in ("weight_decay", "eps", "warmup_steps", "grad_clip", "schedule_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError("decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ConfigError("warmup_fraction", f"must be in [0, 1) or null, got {self.warmup_fraction}")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a schedule spanning `total_steps`: the fraction's share (rounded), or warmup_steps."""
        if self.warmup_fraction is None:
            return self.warmup_steps
        return round(self.warmup_fraction * total_steps)


@dataclass
class ParallelConfig:
    zero_stage: Literal[0, 1, 2, 3] = 3
    """DeepSpeed ZeRO stage: 3 partitions parameters, gradients and optimizer state."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Parameter/compute dtype; ZeRO keeps fp32 master weights for bf16/fp16 (fp16 adds dynamic loss scaling)."""
    tp_size: int = 1
    """Tensor-parallel degree (DeepSpeed AutoTP, ZeRO 0-2 only); data-parallel size = world size / tp_size."""
    activation_checkpointing: bool = False
    """Recompute layer activations in backward: less memory, ~30% more compute."""
    offload_optimizer: bool = False
    """Keep optimizer state (and the step) in CPU memory (ZeRO-Offload; ZeRO 1-3)."""
    offload_params: bool = False
    """Keep partitioned parameters in CPU memory between uses (ZeRO-3 only)."""
    fp16_initial_scale_power: int = 16
    """fp16 only: the dynamic loss scale starts at 2**this."""
    fp16_loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the loss scale doubles."""
    fp16_hysteresis: int = 2
    """fp16 only: overflows tolerated before the loss scale halves."""
    reduce_fp32: bool = False
    """Reduce gradients across data-parallel ranks in fp32 instead of the training precision (bf16/fp16):
    exact sums at large data-parallel sizes, twice the bytes on the network."""
    collective_timeout_min: float = 10.0
    """Minutes a collective may wait for the slowest rank before the run fails (DeepSpeed's default 10);
    raise it when rank 0 does long work the others wait for (a huge corpus's first checksum pass)."""

    def validate(self) -> None:
        if self.collective_timeout_min <= 0:
            raise ConfigError("collective_timeout_min", f"must be > 0, got {self.collective_timeout_min}")
        if self.tp_size < 1:
            raise ConfigError("tp_size", f"must be >= 1, got {self.tp_size}")
        if self.tp_size > 1 and self.zero_stage == 3:
            raise ConfigError(
                "tp_size",
                f"AutoTP (tp_size={self.tp_size}) does not train under ZeRO-3; supported: tp_size > 1 with "
                "zero_stage 0, 1 or 2, or zero_stage 3 with tp_size 1 (pure data parallel)",
            )
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(
                "offload_params",
                f"parameter offload needs zero_stage 3, got {self.zero_stage}; supported: zero_stage 3 with "
                "offload_params, or offload_optimizer with zero_stage 1 or 2",
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer", "needs zero_stage 1, 2 or 3 (ZeRO-Offload), got 0")
        if self.tp_size > 1 and (self.offload_optimizer or self.offload_params):
            raise ConfigError(
                "tp_size",
                "AutoTP with CPU offload is not supported; use tp_size 1 with offload, or no offload",
            )
        if self.fp16_initial_scale_power < 0 or self.fp16_loss_scale_window < 1 or self.fp16_hysteresis < 1:
            raise ConfigError(
                "fp16_initial_scale_power", "fp16 loss-scale settings must be >= 0 / >= 1 / >= 1"
            )

    def dp_size(self, world_size: int) -> int:
        """Data-parallel size; ConfigError when tp_size does not divide the world size."""
        if world_size % self.tp_size:
            raise ConfigError(
                "parallel.tp_size", f"must divide the world size ({world_size}), got {self.tp_size}"
            )
        return world_size // self.tp_size


@dataclass
class RunConfig:
    name: str = "tiny"
    """Run name; outputs go to `<dir>/<name>/`. Starting a run whose folder has a checkpoint resumes it."""
    dir: Path = Path("runs")
    seed: int = 1234
    """Seed of the weight init (new heads, adapters) and of torch/numpy/python RNGs (per rank: seed + rank)."""

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError("name", f"must be a plain folder name, got {self.name!r}")


@dataclass
class LoopConfig:
    """The training loop's settings, the same for every task (`train:` in a run's YAML)."""

    log_every: int = 10
    """Steps between metrics.jsonl rows (and a log line)."""
    eval_every: int = 50
    """Steps between validation passes; 0 = only at the end."""
    save_every: int = 50
    """Steps between checkpoints; one is always written at the end. 0 = only at the end."""
    keep_last: int = 2
    """Checkpoints kept on disk besides the best one (older ones are deleted after a newer one is complete)."""
    max_nonfinite: int = 3
    """Consecutive steps with a non-finite loss or gradient norm (each skipped and counted) after which
    the run saves a checkpoint, writes the offending sample indices and stops."""
    spike_window: int = 128
    """Loss-spike guard: steps of history (finite, non-spike steps) the z-scores of the loss and of the
    gradient norm are taken over; no step is judged before the window is full. 0 = guard off."""
    spike_zscore: float = 6.0
    """A step whose loss (or gradient norm) is more than this many standard deviations above the
    window's mean is a spike: logged and counted (`spikes_loss`, `spikes_grad_norm` in metrics.jsonl)."""
    spike_skip: bool = False
    """Also skip the update of a loss spike (decided before the optimizer step, on every rank; the
    gradient-norm spike is only known after it, so it is logged and counted only)."""
    early_stop_metric: str = ""
    """Validation metric whose best checkpoint is kept on disk (besides `keep_last`) and recorded in
    best.json; fine-tuning exports it. "" = none (pretraining's default)."""
    patience: int = 0
    """Stop after this many evals in a row without improving `early_stop_metric` by `min_delta`;
    0 = never stop early."""
    min_delta: float = 0.0
    """Smallest change of the metric that counts as an improvement."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU; 0 = from the built-in table (device and precision),
    and "n/a" for devices it does not know."""
    progress: bool = True
    """A progress bar on rank 0 (when stderr is a terminal, or GRISTMILL_PROGRESS=1)."""
    wandb_project: str = ""
    """Also log the metrics rows to this Weights & Biases project ("" = off; needs `pip install wandb`)."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline writes the W&B run under <run dir>/wandb for a later `wandb sync` (air-gapped clusters)."""

    def validate(self) -> None:
        if self.peak_tflops < 0:
            raise ConfigError("peak_tflops", f"must be >= 0 (0 = from the table), got {self.peak_tflops}")
        for key in ("log_every", "keep_last", "max_nonfinite"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "save_every", "spike_window", "patience", "min_delta"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.spike_window == 1:
            raise ConfigError(
                "spike_window", "must be 0 (off) or >= 2 (a standard deviation needs two steps)"
            )
        if self.spike_window and not self.spike_zscore > 0:
            raise ConfigError("spike_zscore", f"must be > 0, got {self.spike_zscore}")
        if self.patience and not self.early_stop_metric:
            raise ConfigError("patience", "early stopping needs a metric: set train.early_stop_metric")
        if self.patience and not self.eval_every:
            raise ConfigError(
                "patience", "early stopping needs evals during training: set train.eval_every > 0"
            )


def check_precision(precision: str) -> None:
    """ConfigError when this machine's DeepSpeed accelerator cannot train in `precision`."""
    from pipeline.runtime.engine import precision_supported

    if not precision_supported(precision):
        raise ConfigError(
            "parallel.precision",
            f"{precision} is not supported by this machine's DeepSpeed accelerator "
            "(on CPU fp16 needs AVX512-FP16/AMX-FP16); use bf16 or fp32",
        )
