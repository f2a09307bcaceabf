"""Fine-tuned checkpoint to a Hugging Face folder: full weights, a PEFT method's result, or a classifier.

One process, no collectives (rank 0 after training, or by hand). DeepSpeed's zero_to_fp32 (via
pipeline/runtime/engine.py) gathers the checkpoint's fp32 weights: all of them for full
fine-tuning, only the trained ones for a peft method (the frozen ones are the starting weights,
read again from the init folder). `out` is written atomically with the init folder's tokenizer
files, after the folder reloads with plain transformers (plus peft for an adapter) and gives the
training model's logits on the batch the checkpoint recorded (`parity.pt`):
- full: the fine-tuned model;
- lora, qlora, ia3: the adapters folded into the weights (only after the merged model's logits
  equal the adapter model's); the adapter alone also goes to `<run dir>/adapter` (loadable with peft);
- prefix, prompt: nothing to fold, so `out` is the untouched base model and `out/adapter` the
  adapter, which `peft.PeftModel.from_pretrained(base, out / "adapter")` loads (and
  pipeline/finetune/generate.py does by itself).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from pipeline.errors import CheckpointError
from pipeline.finetune import adapters
from pipeline.finetune.config import FinetuneConfig
from pipeline.io import atomic_dir
from pipeline.runtime import checkpoint
from pipeline.runtime.engine import consolidated_state_dict
from pipeline.train.export import PARITY_TOL, TOKENIZER_FILES

log = logging.getLogger(__name__)

ADAPTER_DIR = adapters.ADAPTER_DIR


def model_config(init_dir: Path, task: str, labels: list[str] | None = None, pad_id: int | None = None):
    """The transformers config of the fine-tuned model: the init folder's, plus the classes for classify."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(init_dir, local_files_only=True)
    if task == "classify":
        if not labels:
            raise CheckpointError(f"{init_dir}: a classifier needs its label names")
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        config.pad_token_id = pad_id
    return config


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM


def build_plain(config, task: str) -> torch.nn.Module:
    """A freshly initialised fp32 model of this config, outside any ZeRO-3 context."""
    return _auto_class(task).from_config(config, dtype=torch.float32)


def load_base(init_dir: Path, config, task: str) -> torch.nn.Module:
    """The starting weights in fp32 (a classifier's new head is freshly initialised: peft trains a copy)."""
    return _auto_class(task).from_pretrained(
        init_dir, config=config, dtype=torch.float32, local_files_only=True
    )


def load_full_state(model: torch.nn.Module, state: dict, where: str) -> None:
    """Load a consolidated state dict; only a tied lm_head may be missing."""
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{where} does not match the init model's config.json: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def export_finetuned(
    cfg: FinetuneConfig,
    tag: str,
    init_dir: Path,
    labels: list[str] | None = None,
    pad_id: int | None = None,
) -> Path:
    """Consolidate `<run dir>/checkpoints/<tag>` into `cfg.out_dir`; returns that folder."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # building models here must not wait for ranks that never join
    root = checkpoint.ckpt_root(cfg.run_dir)
    state = consolidated_state_dict(root, tag)
    config = model_config(init_dir, cfg.task, labels, pad_id)
    out = Output(cfg.out_dir, init_dir, cfg.task, config, root / tag / "parity.pt")
    if cfg.method == "full":
        model = build_plain(config, cfg.task)
        load_full_state(model, state, f"{root}/{tag}")
        out.write_merged(model)
    else:
        method = "lora" if cfg.method == "qlora" else cfg.method  # qlora merges into the full-precision base
        peft_model = adapters.load_adapter_state(
            load_base(init_dir, config, cfg.task), method, cfg.peft, cfg.task, state
        )
        if method in adapters.MERGEABLE:
            with atomic_dir(cfg.run_dir / ADAPTER_DIR) as tmp:
                peft_model.save_pretrained(tmp)
            out.write_merged(adapters.merge_checked(peft_model, probe_ids(config.vocab_size)))
        else:
            out.write_unmerged(peft_model)
    log.info("exported %s/%s (%s) to %s", root, tag, cfg.method, cfg.out_dir)
    return cfg.out_dir


class Output:
    """The export folder of one run: written atomically, checked before it appears."""

    def __init__(self, folder: Path, init_dir: Path, task: str, config, parity_file: Path):
        self.folder, self.init_dir, self.task, self.config = Path(folder), Path(init_dir), task, config
        self.parity_file = parity_file

    def write_merged(self, model: torch.nn.Module) -> None:
        """A plain transformers model (full fine-tuning, or adapters folded in)."""
        model.config.use_cache = True  # for generation; training turned it off
        with atomic_dir(self.folder) as tmp:
            model.save_pretrained(tmp)
            self._finish(tmp, check_reload(tmp, self.task, self.config))

    def write_unmerged(self, peft_model) -> None:
        """The untouched base model, with the adapter in its `adapter/` subfolder."""
        peft_model.get_base_model().config.use_cache = True
        with atomic_dir(self.folder) as tmp:
            adapters.write_unmerged(peft_model, tmp, tmp / ADAPTER_DIR)
            adapters.check_unmerged(peft_model, tmp, tmp / ADAPTER_DIR, probe_ids(self.config.vocab_size))
            base = check_reload(tmp, self.task, self.config)
            self._finish(tmp, adapters.attach_adapter(base, tmp / ADAPTER_DIR))

    def _finish(self, tmp: Path, reloaded: torch.nn.Module) -> None:
        for f in sorted(self.init_dir.iterdir()):
            if f.name in TOKENIZER_FILES:
                shutil.copy2(f, tmp / f.name)
        check_parity(reloaded, self.parity_file, tmp)


def probe_ids(vocab_size: int) -> torch.Tensor:
    """A fixed (1, 16) batch of token ids for export checks."""
    return (torch.arange(16) * 7 % vocab_size).unsqueeze(0)


@torch.no_grad()
def check_reload(folder: Path, task: str, config) -> torch.nn.Module:
    """The folder reloaded (fp32, eval mode) with the Auto class of the task; CheckpointError unless
    its logits are finite and shaped."""
    model = _auto_class(task).from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    logits = model(input_ids=probe_ids(config.vocab_size)).logits
    width = config.num_labels if task == "classify" else config.vocab_size
    if logits.shape[-1] != width or not torch.isfinite(logits).all():
        raise CheckpointError(f"{folder}: reloaded model gives bad logits (shape {tuple(logits.shape)})")
    return model


@torch.no_grad()
def check_parity(model: torch.nn.Module, parity_file: Path, where: Path) -> float | None:
    """Max |logit diff| of the reloaded export against the training model on the batch the checkpoint
    recorded; CheckpointError beyond the training precision's tolerance (None without a record)."""
    if not parity_file.is_file():
        log.warning("%s missing (older checkpoint): export not compared with the training model", parity_file)
        return None
    ref = torch.load(parity_file, weights_only=True)
    got, want = model(input_ids=ref["input_ids"]).logits.float(), ref["logits"].float()
    if got.shape != want.shape:
        raise CheckpointError(
            f"{where}: logits shape {tuple(got.shape)}, training model gave {tuple(want.shape)}"
        )
    diff = float((got - want).abs().max())
    tol = PARITY_TOL[ref["precision"]] * max(1.0, float(want.abs().max()))
    if not diff <= tol:
        raise CheckpointError(
            f"{where}: the export's logits differ from the training model's by {diff:.3g} (tolerance "
            f"{tol:.3g}); export not written"
        )
    log.info("export parity with the training model: max |logit diff| %.3g (tolerance %.3g)", diff, tol)
    return diff
