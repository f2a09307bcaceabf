"""FinetuneConfig: the YAML schema of a supervised fine-tuning run (`configs/finetune/*.yaml`).

The batch, optimizer and parallelism sections are the pretraining ones (`pipeline/train/config.py`),
so DeepSpeed settings come from one place. What is specific to fine-tuning: where the starting
weights come from (`init_from`), the instruction data, and epochs instead of a token budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.train.config import BatchConfig, OptimConfig, ParallelConfig


@dataclass
class FtRunConfig:
    name: str = "sft"
    """Run name; outputs go to `<dir>/<name>/`."""
    dir: Path = Path("runs")
    """Folder holding run directories."""

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError("name", f"must be a plain folder name, got {self.name!r}")


@dataclass
class SFTDataConfig:
    path: Path = Path("tests/data/sample/instructions.jsonl")
    """Alpaca-style records {instruction, input, output}: a JSON array file or JSONL."""
    seq_len: int = 256
    """Tokens per example (BOS + prompt + response + EOS); longer ones lose the end of the response."""
    valid_fraction: float = 0.05
    """Share of records held out for eval loss, chosen by a hash of the record text."""
    seed: int = 1234
    """Seed of the split and of the per-epoch shuffle."""

    def validate(self) -> None:
        if self.seq_len < 8:
            raise ConfigError("seq_len", f"must be >= 8, got {self.seq_len}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError("valid_fraction", f"must be in [0, 1), got {self.valid_fraction}")


@dataclass
class FtTrainConfig:
    epochs: int = 1
    """Passes over the train split (the last partial global batch of each epoch is dropped)."""
    max_steps: int | None = None
    """Optimizer steps to run instead of `epochs` (cycles through epochs as needed)."""
    log_every: int = 10
    """Optimizer steps between metrics.jsonl lines."""
    eval_every: int = 0
    """Optimizer steps between eval-loss passes on the valid split; 0 = only at the end."""
    eval_max_batches: int | None = None
    """Cap on micro batches per rank in one eval pass (None = the whole valid split)."""

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError("epochs", f"must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps", f"must be >= 1 or null, got {self.max_steps}")
        for key in ("log_every", "eval_every"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            raise ConfigError("eval_max_batches", f"must be >= 1 or null, got {self.eval_max_batches}")


@dataclass
class FinetuneConfig:
    init_from: Path
    """Starting weights: a pretraining run dir (its latest checkpoint is exported into this run's
    `init_hf/`) or a Hugging Face folder (with config.json and tokenizer files)."""
    run: FtRunConfig = field(default_factory=FtRunConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: FtTrainConfig = field(default_factory=FtTrainConfig)
    out: Path | None = None
    """Folder of the exported fine-tuned model; default `<run dir>/hf`."""

    def validate(self) -> None:
        if not (is_hf_folder(self.init_from) or is_run_dir(self.init_from)):
            raise ConfigError(
                "init_from",
                f"{self.init_from} is neither a Hugging Face folder (config.json) nor a pretraining run "
                "dir (checkpoints/latest)",
            )

    @property
    def run_dir(self) -> Path:
        return self.run.dir / self.run.name

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else self.run_dir / "hf"


def is_hf_folder(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "checkpoints" / "latest").is_file()
