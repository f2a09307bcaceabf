"""Export a pretraining run's ZeRO checkpoint as a Hugging Face folder (safetensors + tokenizer).

Runs in one process on CPU with no process group: DeepSpeed's zero_to_fp32 (via engine.py)
gathers the partitioned fp32 master weights, a plain LlamaForCausalLM built from the run's
resolved config loads them strictly, and `save_pretrained` writes the folder, which appears
atomically only after it reloads with AutoModelForCausalLM and gives finite logits.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.errors import CheckpointError, DataError
from pipeline.io import atomic_dir
from pipeline.model.build import build_model
from pipeline.train import checkpoint
from pipeline.train.config import ResolvedPretrainConfig
from pipeline.train.engine import consolidated_state_dict

log = logging.getLogger(__name__)


def load_run_config(run_dir: Path) -> ResolvedPretrainConfig:
    """The resolved config a run saved (runs/<name>/config.yaml)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is {run_dir} a pretraining run folder?")
    return load_config(ResolvedPretrainConfig, path)


def export_hf(run_dir: Path, out_dir: Path, tag: str | None = None) -> Path:
    """Consolidate checkpoints/<tag> (default: latest) of run_dir into a save_pretrained folder."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    rcfg = load_run_config(run_dir)
    tag = tag or checkpoint.latest_tag(run_dir)
    if tag is None:
        raise CheckpointError(f"{checkpoint.ckpt_root(run_dir)}/latest: not found; the run has no checkpoint")
    state = consolidated_state_dict(checkpoint.ckpt_root(run_dir), tag)
    d = rcfg.derived
    model = build_model(rcfg.model, bos_id=d.bos_id, eos_id=d.eos_id, pad_id=d.pad_id, partitioned=False)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{run_dir}/checkpoints/{tag} does not match the model in config.yaml: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    tokenizer_dir = _tokenizer_dir(rcfg)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        for f in sorted(tokenizer_dir.iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        check_reload(tmp, rcfg.model.vocab_size)
    log.info("exported %s/checkpoints/%s to %s", run_dir, tag, out_dir)
    return out_dir


def _tokenizer_dir(rcfg: ResolvedPretrainConfig) -> Path:
    """The tokenizer folder from the manifest: as written, else relative to the token folder."""
    path = rcfg.derived.tokenizer
    for cand in (path, rcfg.data.tokens / path):
        if (cand / "tokenizer.model").is_file() or (cand / "tokenizer_config.json").is_file():
            return cand
    raise DataError(f"{path}: tokenizer folder (recorded in {rcfg.data.tokens}/manifest.json) not found")


def check_reload(folder: Path, vocab_size: int) -> None:
    """Load `folder` with AutoModelForCausalLM and require finite logits of the right shape."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.arange(min(8, vocab_size)).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if logits.shape[-1] != vocab_size or not torch.isfinite(logits).all():
        raise CheckpointError(f"{folder}: reloaded model gives bad logits (shape {tuple(logits.shape)})")
