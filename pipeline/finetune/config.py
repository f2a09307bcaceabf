"""FinetuneConfig: the YAML schema of a fine-tuning run (`configs/finetune/*.yaml`).

The run, batch, optimizer and parallelism sections and the loop settings are the shared
runtime's (`pipeline/runtime/config.py`), so DeepSpeed and loop settings come from one place.
What is specific to fine-tuning: where the starting weights come from (`init_from`), the task
(`sft` on instruction/chat data, `classify` on labelled text, or `dpo` on preference pairs), the
method (`full` weights or a peft method: LoRA, QLoRA, prefix tuning, prompt tuning, IA3), epochs
instead of a token budget, and early stopping on a validation metric by default (the best
checkpoint is the one exported).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.errors import ConfigError
from pipeline.runtime.config import BatchConfig, LoopConfig, OptimConfig, ParallelConfig, RunConfig


@dataclass
class FtRunConfig(RunConfig):
    name: str = "sft"
    """Run name; outputs go to `<dir>/<name>/`. Starting a run whose folder has a checkpoint resumes it."""


@dataclass
class SFTDataConfig:
    path: Path = Path("tests/data/sample/instructions.jsonl")
    """SFT: Alpaca {instruction, input, output}, self-instruct {instruction, instances} or chat
    {messages: [{role, content}]} records, in a JSON array file or JSONL. classify: a CSV, TSV or
    JSONL file of labelled texts (see the `classify` section). dpo: preference records, a prompt
    with a chosen and a rejected answer (`{prompt, chosen, rejected}`, or chat `messages` with
    chosen and rejected final assistant turns; pipeline/finetune/preferences.py lists the shapes)."""
    seq_len: int = 256
    """Tokens per example (BOS + prompt + response + EOS; for dpo, per side of a pair); longer ones
    lose their end (counted as `truncated` in metrics.jsonl)."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """Prompt format of Alpaca records (SFT) and text prompts (DPO): the `### Instruction` template,
    or the tokenizer's chat template (as one user turn and one assistant turn). Chat records always
    use the chat template."""
    pack: bool = False
    """SFT: pack several examples into each seq_len row (no attention across them); batches then
    count packed rows, not examples."""
    valid_fraction: float = 0.05
    """Share of records held out for validation (eval loss; accuracy and macro F1 for classify),
    chosen by a hash of the record's content, so the split does not depend on file order."""
    seed: int = 1234
    """Seed of the split and of the per-epoch shuffle."""

    def validate(self) -> None:
        if self.seq_len < 8:
            raise ConfigError("seq_len", f"must be >= 8, got {self.seq_len}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError("valid_fraction", f"must be in [0, 1), got {self.valid_fraction}")


@dataclass
class FtTrainConfig(LoopConfig):
    """The shared loop settings plus fine-tuning's epochs and eval size."""

    eval_every: int = 0
    """Steps between validation passes; 0 = only at the end."""
    early_stop_metric: Literal["eval_loss", "accuracy", "macro_f1"] | None = None
    """Validation metric that picks the best checkpoint (lower is better for eval_loss, higher for
    the others; accuracy and macro_f1 need task classify). The best checkpoint is the one exported.
    None = the task's own: macro_f1 for classify (accuracy rewards a model that predicts only the
    majority class of an imbalanced split), eval_loss otherwise."""
    epochs: int = 1
    """Passes over the train split (the last partial global batch of each epoch is dropped)."""
    max_steps: int | None = None
    """Optimizer steps to run instead of `epochs` (cycles through epochs as needed)."""
    eval_max_batches: int | None = None
    """Cap on micro batches per rank in one eval pass (None = the whole valid split)."""

    def validate(self) -> None:
        super().validate()
        if self.epochs < 1:
            raise ConfigError("epochs", f"must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps", f"must be >= 1 or null, got {self.max_steps}")
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            raise ConfigError("eval_max_batches", f"must be >= 1 or null, got {self.eval_max_batches}")


@dataclass
class PeftSection:
    """Settings of the parameter-efficient methods; each method reads only its own fields."""

    rank: int = 8
    """lora/qlora: rank r of the low-rank update B @ A."""
    alpha: float = 16.0
    """lora/qlora: scale of the update: it is multiplied by alpha / rank."""
    dropout: float = 0.0
    """lora/qlora: dropout on the adapter's input."""
    target_modules: list[str] | None = None
    """lora/qlora/ia3: names (last component) of the Linear layers adapted; None = the method's
    default (lora: every attention and MLP projection; ia3: k_proj, v_proj, down_proj)."""
    feedforward_modules: list[str] | None = None
    """ia3: the targets whose input (not output) is rescaled; None = the MLP ones among the targets."""
    num_virtual_tokens: int = 16
    """prefix/prompt: learned virtual tokens (prefix: per layer as keys and values; prompt: as input
    embeddings before the text)."""
    prefix_projection: bool = False
    """prefix: learn the prefixes through a 2-layer MLP (the prefix-tuning paper's reparametrisation)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """qlora: 4-bit data type of the frozen base weights (bitsandbytes, CUDA only)."""
    double_quant: bool = True
    """qlora: also quantize the quantization constants (saves ~0.4 bits per weight)."""

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError("rank", f"must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError("alpha", f"must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("target_modules", "must name at least one module (e.g. q_proj), or be null")
        if self.num_virtual_tokens < 1:
            raise ConfigError("num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}")
        targets, ff = self.target_modules, self.feedforward_modules
        extra = set(ff) - set(targets) if ff is not None and targets is not None else set()
        if extra:
            raise ConfigError("feedforward_modules", f"{sorted(extra)} are not in target_modules")


@dataclass
class DPOSection:
    """Direct preference optimisation (task dpo): pairs of a preferred and a rejected answer.

    `batch.global_size` and `batch.micro_size` count pairs; a micro batch of m pairs is one forward
    over 2m rows (the chosen ones, then the rejected ones)."""

    beta: float = 0.1
    """How far the policy may move from the reference: rewards are beta x log(policy / reference)."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid`: DPO's -log sigmoid(reward margin); `ipo`: IPO's (per-token log-ratio margin -
    1 / (2 beta))^2, which does not push the margin to infinity on deterministic preferences."""
    reference_file: Path | None = None
    """Log-probabilities of every pair under the starting model, computed once before training
    (so no second model sits in memory); None = `<run dir>/dpo_reference.pt`. Reused when present
    (a resumed run); an error when it does not match the data or the model."""

    def validate(self) -> None:
        if not self.beta > 0:
            raise ConfigError("beta", f"must be > 0, got {self.beta}")


@dataclass
class ClassifySection:
    text_column: str = "text"
    """Column holding the text: a name (header row or JSONL key) or a 0-based index as a string."""
    label_column: str = "label"
    """Column holding the label, named or indexed like `text_column`."""
    header: bool = True
    """CSV/TSV: whether the first row names the columns (false for the VADER files)."""
    binarize_at: float | None = None
    """Numeric labels: `negative` below this value, `positive` above it; rows exactly at it are
    skipped (counted as `label_at_threshold`). None: labels are taken as strings."""
    labels: list[str] = field(default_factory=list)
    """Class names in id order; empty = the sorted distinct labels of the training split."""
    head_lr: float | None = None
    """Peak learning rate of the new classification head (`score`), which starts from random values
    while the body is pretrained; it follows the same warmup and decay as optim.lr. None = optim.lr."""
    tfidf_baseline: bool = True
    """Fit the TF-IDF + logistic-regression baseline on the train split before training (seconds for
    ~10k texts, on rank 0) and compare the model with it at the end; the majority-class baseline is
    always computed."""

    def validate(self) -> None:
        if self.head_lr is not None and not self.head_lr > 0:
            raise ConfigError("head_lr", f"must be > 0 or null, got {self.head_lr}")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("labels", f"must be distinct, got {self.labels}")
        if self.labels and len(self.labels) < 2:
            raise ConfigError("labels", f"needs at least 2 classes, got {self.labels}")


@dataclass
class FinetuneConfig:
    init_from: Path
    """Starting weights: a pretraining run dir (its latest checkpoint is exported into this run's
    `init_step_<N>/`) or a Hugging Face folder (with config.json and tokenizer files)."""
    task: Literal["sft", "classify", "dpo"] = "sft"
    """`sft`: next-token loss on the answers; `classify`: a sequence-classification head; `dpo`:
    preference pairs (the `dpo` section)."""
    method: Literal["full", "lora", "qlora", "prefix", "prompt", "ia3"] = "full"
    """`full`: train every weight (ZeRO-3 partitions them); otherwise train only a peft method's
    parameters (the `peft` section): `lora` and `ia3` export a merged model, `prefix` and `prompt`
    the base model plus an adapter folder; `qlora` is LoRA on a 4-bit base (CUDA only)."""
    run: FtRunConfig = field(default_factory=FtRunConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: FtTrainConfig = field(default_factory=FtTrainConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    classify: ClassifySection = field(default_factory=ClassifySection)
    out: Path | None = None
    """Folder of the exported fine-tuned model; default `<run dir>/hf`."""

    def __post_init__(self) -> None:
        if self.train.early_stop_metric is None:  # the task's own; set before the sections are validated
            self.train.early_stop_metric = "macro_f1" if self.task == "classify" else "eval_loss"

    def validate(self) -> None:
        if not (is_hf_folder(self.init_from) or is_run_dir(self.init_from)):
            raise ConfigError(
                "init_from",
                f"{self.init_from} is neither a Hugging Face folder (config.json) nor a pretraining run "
                "dir (checkpoints/latest)",
            )
        if self.task != "classify" and self.train.early_stop_metric != "eval_loss":
            raise ConfigError(
                "train.early_stop_metric",
                f"{self.train.early_stop_metric} needs task classify; {self.task} runs stop on eval_loss",
            )
        if self.task != "sft" and self.data.pack:
            raise ConfigError("data.pack", f"packing is for sft; {self.task} examples are one per row")
        if self.method in ("prefix", "prompt") and self.data.pack:
            raise ConfigError(
                "data.pack", f"{self.method} tuning ignores the position resets packing needs; set it false"
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
