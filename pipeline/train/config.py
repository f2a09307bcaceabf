"""PretrainConfig (the YAML of `configs/pretrain/*.yaml`) and `resolve()`, which derives the rest.

Sections `BatchConfig`, `OptimConfig` and `ParallelConfig` are shared with fine-tuning. The model
is given as `model.file` (a `configs/model/*.yaml`) plus `model.overrides` (field -> value), e.g.

    model:
      file: configs/model/tiny.yaml
      overrides: {hidden_size: 128}

`resolve(cfg, world_size)` runs before any process group starts: it reads the token manifest
(vocab, special ids), derives gradient accumulation, checks the device can honour the precision
and returns a `ResolvedPretrainConfig`, which the trainer saves as `runs/<name>/config.yaml`
and which export reads back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.model.config import ModelConfig


@dataclass
class RunConfig:
    name: str = "tiny"
    """Run name; outputs go to `<dir>/<name>/`. Starting a run whose folder has a checkpoint resumes it."""
    dir: Path = Path("runs")
    seed: int = 1234
    """Seed of the weight init and of torch/numpy/python RNGs (per rank: seed + rank)."""

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError("name", f"must be a plain folder name, got {self.name!r}")


@dataclass
class BlendSource:
    tokens: Path
    """A token folder (manifest.json + shards) made with the same tokenizer as `data.tokens`."""
    weight: float = 1.0
    """Relative share of the training samples drawn from it."""


@dataclass
class TokensDataConfig:
    tokens: Path = Path("out/wiki_sample/tokens")
    """Folder with the token shards and manifest.json written by data prep."""
    blend: list[BlendSource] = field(default_factory=list)
    """Train on a weighted mix of token folders instead of `tokens`' train split, e.g.
    [{tokens: out/wiki/tokens, weight: 0.3}, {tokens: out/web/tokens, weight: 0.7}]; `tokens` still
    gives the vocabulary and the validation split."""
    seq_len: int = 128
    """Tokens per training sequence; documents are packed across boundaries."""
    seed: int = 1234
    """Seed of the sample order (a pure function of seed, epoch and global index)."""
    verify_checksums: bool = True
    """Check every shard's sha256 against the manifest before training (slow for huge corpora)."""

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ConfigError("seq_len", f"must be >= 2, got {self.seq_len}")
        for i, src in enumerate(self.blend):
            if not src.weight > 0:
                raise ConfigError(f"blend[{i}].weight", f"must be > 0, got {src.weight}")


@dataclass
class ModelRef:
    file: Path | None = None
    """A configs/model/*.yaml (ModelConfig); None = ModelConfig's defaults."""
    overrides: dict[str, int | float | bool] = field(default_factory=dict)
    """ModelConfig fields to change on top of `file`, e.g. {hidden_size: 128}."""


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

    def validate(self) -> None:
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
class TrainLoopConfig:
    max_steps: int = 100
    """Optimizer steps of the whole run (a resumed run continues up to this)."""
    log_every: int = 10
    """Steps between metrics.jsonl rows (and a log line)."""
    eval_every: int = 50
    """Steps between validation passes; 0 = only at the end."""
    eval_batches: int = 4
    """Global batches (batch.global_size sequences each) in one validation pass, from the start of
    the valid split (unshuffled, wrapping around if it is shorter)."""
    save_every: int = 50
    """Steps between checkpoints; one is always written at the end. 0 = only at the end."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted after a newer one is complete)."""
    max_nonfinite: int = 3
    """Consecutive steps with a non-finite loss or gradient norm (each skipped and counted) after which
    the run saves a checkpoint, writes the offending sample indices and stops."""
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
        if self.max_steps < 1:
            raise ConfigError("max_steps", f"must be >= 1, got {self.max_steps}")
        if self.peak_tflops < 0:
            raise ConfigError("peak_tflops", f"must be >= 0 (0 = from the table), got {self.peak_tflops}")
        for key in ("log_every", "keep_last", "eval_batches", "max_nonfinite"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "save_every"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: TokensDataConfig = field(default_factory=TokensDataConfig)
    model: ModelRef = field(default_factory=ModelRef)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)


@dataclass
class DerivedConfig:
    """Values computed by resolve(); never set by hand."""

    world_size: int = 1
    dp_size: int = 1
    grad_accum: int = 1
    tokens_per_step: int = 0
    num_params: int = 0
    flops_per_token: float = 0.0
    tokenizer: Path = Path()
    """The tokenizer folder recorded in the manifest (copied into HF exports)."""
    tokenizer_fingerprint: str = ""
    bos_id: int = -1
    eos_id: int = -1
    pad_id: int = -1


@dataclass
class ResolvedPretrainConfig:
    """A PretrainConfig with the model spelled out and the derived values filled in."""

    run: RunConfig
    data: TokensDataConfig
    model: ModelConfig
    batch: BatchConfig
    optim: OptimConfig
    parallel: ParallelConfig
    train: TrainLoopConfig
    derived: DerivedConfig

    @property
    def run_dir(self) -> Path:
        return self.run.dir / self.run.name


def load_model_config(ref: ModelRef) -> ModelConfig:
    """ModelConfig from `ref.file` plus `ref.overrides`, checked like any config file."""
    # json.dumps gives YAML-parsable scalars (true, 1e-05, 128) for load_config's override syntax.
    overrides = [f"{k}={json.dumps(v)}" for k, v in ref.overrides.items()]
    try:
        return load_config(ModelConfig, ref.file, overrides)
    except ConfigError as exc:
        key = f"model.overrides.{exc.key}" if exc.key in ref.overrides else f"model.{exc.key}"
        raise ConfigError(key, exc.msg, exc.file) from None


def resolve(cfg: PretrainConfig, world_size: int, *, check_device: bool = True) -> ResolvedPretrainConfig:
    """Derive the batch arithmetic, vocab and model size; ConfigError naming the key on any conflict."""
    from pipeline.data.manifest import load_manifest  # the trainer's only link to data prep
    from pipeline.model.flops import flops_per_token, num_params

    model = load_model_config(cfg.model)
    if model.max_seq_len < cfg.data.seq_len:
        raise ConfigError(
            "data.seq_len", f"must be <= model.max_seq_len ({model.max_seq_len}), got {cfg.data.seq_len}"
        )
    tok = load_manifest(cfg.data.tokens)["tokenizer"]
    if model.vocab_size and model.vocab_size != tok["vocab_size"]:
        raise ConfigError(
            "model.vocab_size",
            f"is {model.vocab_size} but the tokenizer in {cfg.data.tokens}/manifest.json has "
            f"{tok['vocab_size']}; set it to 0 to take the tokenizer's",
        )
    model.vocab_size = tok["vocab_size"]
    if cfg.parallel.tp_size > 1 and model.tie_embeddings:
        raise ConfigError(
            "model.tie_embeddings",
            "AutoTP splits lm_head over the vocabulary, and a tied embedding would be split with it "
            "(wrong logits); with parallel.tp_size > 1 set tie_embeddings: false, or use tp_size 1",
        )
    if check_device:
        check_precision(cfg.parallel.precision)
    dp = cfg.parallel.dp_size(world_size)
    derived = DerivedConfig(
        world_size=world_size,
        dp_size=dp,
        grad_accum=cfg.batch.grad_accum(dp),
        tokens_per_step=cfg.batch.global_size * cfg.data.seq_len,
        num_params=num_params(model),
        flops_per_token=flops_per_token(model, cfg.data.seq_len),
        tokenizer=Path(tok["path"]),
        tokenizer_fingerprint=tok["fingerprint"],
        bos_id=tok["bos_id"],
        eos_id=tok["eos_id"],
        pad_id=tok["pad_id"],
    )
    return ResolvedPretrainConfig(
        cfg.run, cfg.data, model, cfg.batch, cfg.optim, cfg.parallel, cfg.train, derived
    )


def check_precision(precision: str) -> None:
    """ConfigError when this machine's DeepSpeed accelerator cannot train in `precision`."""
    from pipeline.train.engine import precision_supported

    if not precision_supported(precision):
        raise ConfigError(
            "parallel.precision",
            f"{precision} is not supported by this machine's DeepSpeed accelerator "
            "(on CPU fp16 needs AVX512-FP16/AMX-FP16); use bf16 or fp32, or set GRISTMILL_CPU_FP16=emulate "
            "to run the fp16 code path with emulated half matmuls (slow; for testing)",
        )
