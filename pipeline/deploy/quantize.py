"""Weight-only quantization for CPU inference with torchao, and its comparison with the original model.

Why torchao: it is PyTorch's own quantization library (released monthly; 0.18 works with torch 2.13
on CPU), and transformers saves and reloads its tensors (`TorchAoConfig`), so a quantized folder
loads with a plain `from_pretrained`. optimum-quanto also runs here (and packs int4 two to a byte),
but its last release is from March 2025 and it still calls itself pre-alpha.

Both the comparison and the export load the model through transformers' torchao integration, so
what is measured is what is exported. Schemes (every linear layer but the output head, which
transformers keeps in full precision; embeddings and norms stay as they are):
- `int8`: per-output-channel symmetric int8 weights (`Int8WeightOnlyConfig`), 1 byte a weight.
- `int4`: int4 values in groups of 32 with one scale each (`IntxWeightOnlyConfig`). torchao's CPU
  build has no packed int4 kernel (its packed formats need CUDA or separately built CPU kernels), so
  the values sit one per int8 byte: 4-bit accuracy, int8 memory. Use GGUF q4_0 for 4-bit memory.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.deploy import require
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.io import atomic_dir

log = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
INT4_GROUP = 32


def torchao_config(scheme: str):
    """The torchao config object of a scheme name."""
    require("torchao", "quantize")
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if scheme == "int8":
        return Int8WeightOnlyConfig()
    if scheme == "int4":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))
    raise ConfigError("quantize", f"unknown scheme {scheme!r}; choose from {list(SCHEMES)}")


def load_quantized(model_dir: Path, scheme: str):
    """The folder's model with its linear weights quantized by torchao (eval mode, fp32 elsewhere)."""
    from transformers import AutoModelForCausalLM, TorchAoConfig

    config = TorchAoConfig(torchao_config(scheme))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, quantization_config=config, local_files_only=True
    )
    return model.eval()


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao keeps int data + scales)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    if type(t) is torch.nn.Parameter and hasattr(t.data, "__tensor_flatten__"):
        return tensor_bytes(t.data)
    return t.numel() * t.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each shared tensor counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 2) -> float:
    """Greedy decoding speed with the KV cache, batch 1: new tokens per second (best of `repeats`)."""
    ids = prompt.view(1, -1)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # never stop early: every variant decodes the same count
            do_sample=False,
            pad_token_id=model.config.pad_token_id or 0,
        )
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def measure(model, tokens: np.ndarray, seq_len: int, batch_size: int, new_tokens: int) -> dict:
    """Perplexity, scoring and decoding tokens/s, and weight MB of one model on `tokens`."""
    from pipeline.finetune.perplexity import perplexity

    ids = torch.from_numpy(tokens.astype(np.int64))
    model.generation_config.use_cache = True
    with torch.no_grad():  # warm-up: first calls pay one-time costs the timing should not see
        model(input_ids=ids[:seq_len][None])
    start = time.perf_counter()
    ppl = perplexity(model, tokens, seq_len, batch_size)
    score_s = time.perf_counter() - start
    return {
        "ppl": ppl["ppl"],
        "nll": ppl["nll"],
        "tokens_scored": ppl["tokens_scored"],
        "score_tokens_per_s": ppl["tokens_scored"] / score_s,
        "decode_tokens_per_s": decode_speed(model, ids[:32], new_tokens),
        "weight_mb": weight_bytes(model) / 2**20,
    }


def compare(
    model_dir: Path,
    tokens: np.ndarray,
    schemes: list[str],
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    new_tokens: int = 32,
) -> list[dict]:
    """`measure` for the original model and each scheme, one after the other in this process on
    the same tokens (so the speed ratios are fair); adds the changes relative to the original."""
    from pipeline.finetune.generate import load_model

    rows = []
    for scheme in ["original", *schemes]:
        model = load_model(model_dir)[0] if scheme == "original" else load_quantized(model_dir, scheme)
        rows.append({"model": scheme, **measure(model, tokens, seq_len, batch_size, new_tokens)})
        del model
    base = rows[0]
    for row in rows:
        row["ppl_change_pct"] = 100.0 * (row["ppl"] / base["ppl"] - 1.0)
        row["weight_ratio"] = row["weight_mb"] / base["weight_mb"]
    return rows


def export_quantized(model_dir: Path, out_dir: Path, scheme: str) -> Path:
    """Write `model_dir` with torchao-quantized weights as a folder `from_pretrained` reloads
    (quantization_config in config.json; needs torchao installed), after checking the reload."""
    from pipeline.train.export import TOKENIZER_FILES

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    model = load_quantized(model_dir, scheme)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        check_quantized_reload(tmp, model)
    log.info("wrote %s (%s, %.1f MB of weights)", out_dir, scheme, weight_bytes(model) / 2**20)
    return out_dir


@torch.no_grad()
def check_quantized_reload(folder: Path, model) -> None:
    """CheckpointError unless `folder` reloads with quantized weights and gives `model`'s logits."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = (torch.arange(32) * 7919 % model.config.vocab_size).view(1, -1)
    want, got = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    if weight_bytes(reloaded) > 1.01 * weight_bytes(model) or not torch.allclose(got, want, atol=1e-5):
        raise CheckpointError(
            f"{folder}: the reloaded quantized model differs from the one saved "
            f"(max |logit diff| {float((got - want).abs().max()):.3g}); folder not written"
        )
