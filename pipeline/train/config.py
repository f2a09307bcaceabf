"""PretrainConfig (the YAML of `configs/pretrain/*.yaml`) and `resolve()`, which derives the rest.

Sections `RunConfig`, `BatchConfig`, `OptimConfig`, `ParallelConfig` and the loop settings
`TrainLoopConfig` builds on are the shared runtime's (`pipeline/runtime/config.py`). The model
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

from pipeline.config import load_config, origin
from pipeline.errors import ConfigError, DataError
from pipeline.model.config import ModelConfig
from pipeline.runtime.config import (
    BatchConfig,
    LoopConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    check_precision,
)


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
class TrainLoopConfig(LoopConfig):
    """The shared loop settings plus pretraining's step budget and validation size."""

    max_steps: int = 100
    """Optimizer steps of the whole run (a resumed run continues up to this)."""
    eval_batches: int = 4
    """Global batches (batch.global_size sequences each) in one validation pass, from the start of
    the valid split (unshuffled, wrapping around if it is shorter)."""
    eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on the training model during the run (names of task YAMLs in
    configs/eval/, or YAML paths; see pipeline/deploy/harness.py), logged in metrics.jsonl as
    `<task>/<metric>`; needs the `deploy` extra. [] = none."""
    eval_tasks_every: int = 0
    """Steps between those evaluations (one also runs at the last step); 0 = only at the end."""
    eval_tasks_limit: int | None = None
    """Documents per task in one evaluation (the first ones of each task); None = all."""

    def validate(self) -> None:
        super().validate()
        for key in ("max_steps", "eval_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.eval_tasks_every < 0:
            raise ConfigError("eval_tasks_every", f"must be >= 0, got {self.eval_tasks_every}")
        if self.eval_tasks_limit is not None and self.eval_tasks_limit < 1:
            raise ConfigError("eval_tasks_limit", f"must be >= 1 or null, got {self.eval_tasks_limit}")


def check_eval_tasks(tasks: list[str]) -> None:
    """ConfigError at `train.eval_tasks` when lm-eval is missing or a task does not resolve to local
    data (checked by resolve(), before training, not when a saved config is read back)."""
    import importlib.util

    from pipeline.deploy.harness import TASK_DIR, task_config

    if tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("train.eval_tasks", "needs lm-evaluation-harness: pip install -e .[deploy]")
    for i, name in enumerate(tasks):
        try:
            task_config(name, TASK_DIR)
        except ConfigError as exc:
            where = f"{exc.file}: {exc.key}: " if exc.file else ""
            raise ConfigError(f"train.eval_tasks[{i}]", where + exc.msg) from None
        except DataError as exc:
            raise ConfigError(f"train.eval_tasks[{i}]", str(exc)) from None


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
    """ModelConfig from `ref.file` plus `ref.overrides`, checked like any config file; an error in an
    override names where `model.overrides` was set (the run's config or the command line), not the
    model file."""
    # json.dumps gives YAML-parsable scalars (true, 1e-05, 128) for load_config's override syntax.
    overrides = [f"{k}={json.dumps(v)}" for k, v in ref.overrides.items()]
    try:
        return load_config(ModelConfig, ref.file, overrides)
    except ConfigError as exc:
        if exc.key.split(".")[0] in ref.overrides:
            raise ConfigError(
                f"model.overrides.{exc.key}", exc.msg, origin(ref, f"overrides.{exc.key}")
            ) from None
        raise ConfigError(f"model.{exc.key}", exc.msg, exc.file) from None


def model_error(cfg: PretrainConfig, key: str, msg: str) -> ConfigError:
    """A ConfigError about a model field: named as the override when model.overrides set it, else
    in the model file that set it (or the run's config, which names that file)."""
    if key in cfg.model.overrides:
        return ConfigError(f"model.overrides.{key}", msg, origin(cfg.model, f"overrides.{key}"))
    return ConfigError(f"model.{key}", msg, str(cfg.model.file) if cfg.model.file else None)


def resolve(
    cfg: PretrainConfig, world_size: int, *, check_device: bool = True, tokenizer: dict | None = None
) -> ResolvedPretrainConfig:
    """Derive the batch arithmetic, vocab and model size; ConfigError naming the key on any conflict.
    `tokenizer` is the manifest's tokenizer section (None: read data.tokens/manifest.json)."""
    from pipeline.data.manifest import load_manifest  # the trainer's only link to data prep
    from pipeline.model.flops import flops_per_token, num_params

    model = load_model_config(cfg.model)
    if model.max_seq_len < cfg.data.seq_len:
        raise ConfigError(
            "data.seq_len", f"must be <= model.max_seq_len ({model.max_seq_len}), got {cfg.data.seq_len}"
        )
    tok = tokenizer or load_manifest(cfg.data.tokens)["tokenizer"]
    if model.vocab_size and model.vocab_size != tok["vocab_size"]:
        raise model_error(
            cfg,
            "vocab_size",
            f"is {model.vocab_size} but the tokenizer ({tok['path'] or cfg.data.tokens}) has "
            f"{tok['vocab_size']}; set it to 0 to take the tokenizer's",
        )
    model.vocab_size = tok["vocab_size"]
    if cfg.parallel.tp_size > 1 and model.tie_embeddings:
        raise model_error(
            cfg,
            "tie_embeddings",
            "AutoTP splits lm_head over the vocabulary, and a tied embedding would be split with it "
            "(wrong logits); with parallel.tp_size > 1 set tie_embeddings: false, or use tp_size 1",
        )
    if check_device:
        check_precision(cfg.parallel.precision)
    check_eval_tasks(cfg.train.eval_tasks)
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
