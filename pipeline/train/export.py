"""Export a pretraining run's checkpoint as a Hugging Face folder, streamed, then verified.

Runs in one process on CPU with no process group. The weights are read one tensor at a time:
DeepSpeed's zero_to_fp32 in lazy mode memory-maps the ZeRO-2/3 optimizer files and gathers one
parameter's partitions on demand (AutoTP checkpoints go through the universal format, which
holds one full tensor per file). Each tensor is cast to the export dtype (the training precision
unless told otherwise) and written into size-capped safetensors shards, so peak memory stays
near one shard, not the fp32 model. The folder gets config.json, generation_config.json, the
tokenizer files (an allow-list, not the whole folder) and the weights, and appears atomically
only after AutoModelForCausalLM reloads it and its logits on the checkpoint's fixed batch
(`parity.pt`, recorded by the training model when it saved) agree within the tolerance of the
coarser of the training precision (which the recorded logits carry) and the export dtype.
Fine-tuning's export (pipeline/finetune/export.py) streams its checkpoints the same way.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.errors import CheckpointError, DataError
from pipeline.io import atomic_dir
from pipeline.model.build import llama_config
from pipeline.runtime import checkpoint
from pipeline.train.config import ResolvedPretrainConfig

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Max |logit difference| allowed, relative to max(1, max |reference logit|): the reloaded model runs
# the same weights with the same kernels, so only reduction order (and half-precision rounding) differs.
PARITY_TOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
MAX_SHARD_BYTES = 2 * 2**30


def load_run_config(run_dir: Path) -> ResolvedPretrainConfig:
    """The resolved config a run saved (runs/<name>/config.yaml)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is {run_dir} a pretraining run folder?")
    return load_config(ResolvedPretrainConfig, path)


def export_hf(
    run_dir: Path,
    out_dir: Path,
    tag: str | None = None,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Consolidate checkpoints/<tag> (default: latest) of run_dir into a verified save_pretrained folder."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    rcfg = load_run_config(run_dir)
    tag = tag or checkpoint.latest_tag(run_dir)
    if tag is None:
        raise CheckpointError(f"{checkpoint.ckpt_root(run_dir)}/latest: not found; the run has no checkpoint")
    trained = rcfg.parallel.precision
    precision = dtype or trained
    if precision not in DTYPES:
        raise CheckpointError(f"export dtype must be one of {list(DTYPES)}, got {precision!r}")
    tensors = checkpoint_tensors(run_dir, tag, rcfg.parallel.tp_size, rcfg.model.tie_embeddings)
    tokenizer_dir = run_tokenizer_dir(rcfg)
    with atomic_dir(out_dir) as tmp:
        _write_config(rcfg, tmp, precision)
        write_safetensors(tensors, tmp, DTYPES[precision], max_shard_bytes)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
        parity = checkpoint.ckpt_root(run_dir) / tag / "parity.pt"
        check_parity(tmp, parity, precision, trained=trained)
    log.info("exported %s/checkpoints/%s to %s (%s)", run_dir, tag, out_dir, precision)
    return out_dir


def checkpoint_tensors(run_dir: Path, tag: str, tp_size: int, tied: bool) -> dict:
    """name -> lazy tensor (`.contiguous()` gives fp32) of a run's checkpoint, tied copies left out.

    ZeRO-1/2/3 checkpoints are read through DeepSpeed's zero_to_fp32 (memory-mapped); AutoTP ones
    through the universal format, converted once by this process (no collectives); ZeRO-0 ones
    (no optimizer partitions) from the module's weights, in the training precision.
    """
    from pipeline.runtime.engine import lazy_state_dict

    root = checkpoint.ckpt_root(run_dir)
    partitioned = any((root / tag).glob("*optim_states.pt"))
    if tp_size > 1 and not partitioned:
        raise CheckpointError(
            f"{root / tag}: an AutoTP checkpoint without ZeRO optimizer partitions (zero_stage 0) cannot "
            "be merged: DeepSpeed's universal conversion needs them; train AutoTP with zero_stage 1 or 2"
        )
    if tp_size > 1:
        tensors = _universal_tensors(run_dir, tag)
    elif not partitioned:
        tensors = _module_tensors(root / tag)
    else:
        tensors = lazy_state_dict(root, tag)
    if tied:
        tensors.pop("lm_head.weight", None)  # the same tensor as model.embed_tokens.weight
    return tensors


class _UniversalTensor:
    """One parameter of a universal checkpoint (zero/<name>/fp32.pt), loaded on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.shape = self.contiguous().shape

    def contiguous(self) -> torch.Tensor:
        obj = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        return obj["param"] if isinstance(obj, dict) else obj


def _module_tensors(folder: Path) -> dict:
    """The module's weights of a ZeRO-0 checkpoint (mp_rank_00_model_states.pt, memory-mapped). They are
    the training precision's: under bf16 the fp32 masters live only in the optimizer's flat groups."""
    path = folder / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: neither ZeRO optimizer partitions nor {path.name}: not a checkpoint"
        )
    return dict(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["module"])


def _universal_tensors(run_dir: Path, tag: str) -> dict:
    """Lazy tensors of checkpoints/<tag> converted to the universal format (AutoTP checkpoints)."""
    utag = tag if tag.startswith(checkpoint.UNIVERSAL_PREFIX) else checkpoint.convert_universal(run_dir, tag)
    zero = checkpoint.ckpt_root(run_dir) / utag / "zero"
    return {
        p.name: _UniversalTensor(p / "fp32.pt") for p in sorted(zero.iterdir()) if (p / "fp32.pt").is_file()
    }


def _write_config(rcfg: ResolvedPretrainConfig, folder: Path, precision: str) -> None:
    from transformers import GenerationConfig

    d = rcfg.derived
    cfg = llama_config(rcfg.model, bos_id=d.bos_id, eos_id=d.eos_id, pad_id=d.pad_id)
    cfg.dtype = DTYPES[precision]
    cfg.use_cache = True  # training turns the KV cache off; generation wants it
    cfg.save_pretrained(folder)
    GenerationConfig.from_model_config(cfg).save_pretrained(folder)


def shard_plan(shapes: dict[str, torch.Size], itemsize: int, max_bytes: int) -> list[list[str]]:
    """Names grouped into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(tensors: dict, folder: Path, dtype: torch.dtype, max_shard_bytes: int) -> list[str]:
    """Write lazy tensors as safetensors shards (+ index when several); one shard in memory at a time."""
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = shard_plan({k: torch.Size(t.shape) for k, t in tensors.items()}, itemsize, max_shard_bytes)
    n = len(plan)
    names = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map, total = {}, 0
    for fname, keys in zip(names, plan):
        shard = dict(_materialise(tensors, keys, dtype))
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * itemsize for t in shard.values())
        weight_map.update(dict.fromkeys(keys, fname))
        del shard
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _materialise(tensors: dict, keys: list[str], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for k in keys:
        yield k, tensors[k].contiguous().to(dtype).contiguous()


def run_tokenizer_dir(rcfg: ResolvedPretrainConfig) -> Path:
    """The tokenizer folder from the manifest: as written, else relative to the token folder."""
    path = rcfg.derived.tokenizer
    for cand in (path, rcfg.data.tokens / path):
        if (cand / "tokenizer.model").is_file() or (cand / "tokenizer_config.json").is_file():
            return cand
    raise DataError(f"{path}: tokenizer folder (recorded in {rcfg.data.tokens}/manifest.json) not found")


def check_parity(
    folder: Path, parity_file: Path, dtype: str, *, trained: str | None = None, classify: bool = False
) -> dict:
    """Reload `folder` in `dtype` and compare its logits with the training model's on the recorded batch.

    The tolerance (PARITY_TOL, relative to the largest reference logit) is the coarser of the export
    dtype's and the training precision's: the reference logits carry the training precision's
    rounding (parity.pt's "precision"; else `trained`), so an fp32 export of a bf16 run is held to
    bf16's tolerance, not fp32's. CheckpointError beyond it (or, without a recorded batch, when the
    logits are not finite). Returns {max_abs_diff, tolerance, top1_agreement}.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    model = cls.from_pretrained(folder, dtype=DTYPES[dtype]).eval()
    if not parity_file.is_file():
        log.warning("%s missing (older checkpoint): only checking that logits are finite", parity_file)
        check_reload(folder, model)
        return {}
    ref = torch.load(parity_file, weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits.float()
    want = ref["logits"].float()
    if logits.shape != want.shape:
        raise CheckpointError(
            f"{folder}: logits shape {tuple(logits.shape)}, training model gave {tuple(want.shape)}"
        )
    reference = ref.get("precision") or trained or dtype
    diff = float((logits - want).abs().max())
    tol = max(PARITY_TOL[reference], PARITY_TOL[dtype]) * max(1.0, float(want.abs().max()))
    top1 = float((logits.argmax(-1) == want.argmax(-1)).float().mean())
    log.info(
        "export parity (%s export of a %s run): max |logit diff| %.3g (tolerance %.3g), top-1 agreement %.3f",
        dtype,
        reference,
        diff,
        tol,
        top1,
    )
    if not diff <= tol:
        raise CheckpointError(
            f"{folder}: exported model's logits differ from the training model's by {diff:.3g} "
            f"(tolerance {tol:.3g}, top-1 agreement {top1:.3f}); export not written"
        )
    return {"max_abs_diff": diff, "tolerance": tol, "top1_agreement": top1}


def check_reload(folder: Path, model: torch.nn.Module) -> None:
    """Require finite logits of the right width from the reloaded model of `folder`."""
    width = model.config.vocab_size if hasattr(model, "lm_head") else model.config.num_labels
    ids = torch.arange(min(8, model.config.vocab_size)).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if logits.shape[-1] != width or not torch.isfinite(logits).all():
        raise CheckpointError(f"{folder}: reloaded model gives bad logits (shape {tuple(logits.shape)})")


def check_names(tensors: dict, config, classify: bool, where: str) -> None:
    """CheckpointError unless the checkpoint has exactly the weights the model of `config` has (only a
    tied lm_head may be missing); checked on the meta device, so no memory is used."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    with torch.device("meta"):
        want = set(cls.from_config(config).state_dict())
    if getattr(config, "tie_word_embeddings", False):
        want.discard("lm_head.weight")
    missing, unexpected = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match the model's config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
