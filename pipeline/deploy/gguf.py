"""Export a Llama model folder (or a pretraining run) as one GGUF file for llama.cpp-family runtimes.

Written with the `gguf` package's writer; the tensor names and metadata keys are llama.cpp's
`llama` architecture as its GGUF spec documents them. Facts this relies on:
- GGUF lists a tensor's dimensions fastest-first; the writer takes numpy (row-major) shapes and
  reverses them, so a torch `(out, in)` weight is stored as it is.
- HF Llama rotates the two halves of each head (`rotate_half`); llama.cpp's `llama` rope rotates
  adjacent pairs. So the rows of every query and key head are reordered from
  `[x0..x(d/2-1), y0..y(d/2-1)]` to `[x0, y0, x1, y1, ...]`, per query head for `attn_q` and per
  key/value head for `attn_k` (grouped-query attention); readers undo it on load.
- 1-D tensors (norms) stay F32. A 2-D tensor whose rows are not a whole number of the type's
  blocks falls back to F16. For the 4/5-bit types, the embedding and output matrices are written
  as Q8_0 (llama.cpp's own quantizer also keeps those at higher precision).
The file is written under a temporary name beside `out`, one tensor in memory at a time, then
(unless `verify=False`) loaded by transformers' GGUF reader, whose logits must match the source
folder's within GGUF_TOL; only then is it renamed to `out`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.deploy import require
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.io import TMP_PREFIX

log = logging.getLogger(__name__)

# --type name -> (GGML tensor type, llama.cpp file type) as named in gguf.constants
GGUF_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
LOW_BIT = {"q5_1", "q5_0", "q4_1", "q4_0"}
# Max |logit difference| between the GGUF (as transformers dequantizes it) and the source folder,
# relative to max(1, max |source logit|). f32 differs by summation order only; the others by the
# rounding of their weights. Set 2.5x (q4 on the random-ish test model) to 40x (f16) above what
# the test model and the sample run's model measured.
GGUF_TOL = {
    "f32": 1e-4,
    "f16": 1e-2,
    "bf16": 3e-2,
    "q8_0": 3e-2,
    "q5_1": 0.1,
    "q5_0": 0.1,
    "q4_1": 0.2,
    "q4_0": 0.2,
}


@dataclass(frozen=True)
class LlamaShape:
    """What the GGUF metadata needs from a transformers LlamaConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    tied: bool


def llama_shape(config, where: Path) -> LlamaShape:
    """The LlamaShape of a transformers config; DataError for anything llama.cpp's `llama` cannot run."""
    if config.model_type != "llama":
        raise DataError(
            f"{where}/config.json: model_type {config.model_type!r}; only 'llama' exports to GGUF"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {
        "rope_type": (rope_type, "default"),
        "hidden_act": (config.hidden_act, "silu"),
        "attention_bias": (bool(config.attention_bias), False),
        "mlp_bias": (bool(getattr(config, "mlp_bias", False)), False),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise DataError(f"{where}/config.json: {key} {got!r} is not exported to GGUF (only {want!r})")
    heads = config.num_attention_heads
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return LlamaShape(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=config.num_key_value_heads or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        context_length=config.max_position_embeddings,
        rope_theta=float(theta if theta is not None else 10000.0),
        rms_norm_eps=float(config.rms_norm_eps),
        tied=bool(config.tie_word_embeddings),
    )


def tensor_names(shape: LlamaShape) -> list[tuple[str, str]]:
    """(transformers name, GGUF name) of every tensor to write, in file order."""
    names = [("model.embed_tokens.weight", "token_embd.weight")]
    per_layer = [
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ]
    for i in range(shape.num_layers):
        names += [(f"model.layers.{i}.{hf}.weight", f"blk.{i}.{gg}.weight") for hf, gg in per_layer]
    names.append(("model.norm.weight", "output_norm.weight"))
    if not shape.tied:  # a tied model has none: llama.cpp and transformers reuse token_embd
        names.append(("lm_head.weight", "output.weight"))
    return names


def rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from halves (HF rotate_half) to adjacent pairs (llama.cpp)."""
    out_dim = weight.shape[0]
    w = weight.reshape(n_head, 2, out_dim // n_head // 2, *weight.shape[1:])  # (head, half, d/2, in)
    return w.swapaxes(1, 2).reshape(weight.shape)


def tensor_type(gguf_name: str, shape: tuple[int, ...], type_name: str):
    """The GGMLQuantizationType this tensor is written in, for the file type `type_name`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) == 1:
        return GGMLQuantizationType.F32
    qtype = GGMLQuantizationType[GGUF_TYPES[type_name][0]]
    if type_name in LOW_BIT and gguf_name in ("token_embd.weight", "output.weight"):
        qtype = GGMLQuantizationType.Q8_0
    block = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return GGMLQuantizationType.F16
    return qtype


def encode(array: np.ndarray, qtype) -> np.ndarray:
    """fp32 array -> what the writer stores: float arrays for F32/F16, packed uint8 blocks otherwise."""
    from gguf import GGMLQuantizationType, quants

    if qtype == GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return quants.quantize(array.astype(np.float32), qtype)


class SafetensorsFolder:
    """Read a save_pretrained folder's tensors by name, one at a time, as fp32 numpy arrays."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(folder / "model.safetensors", framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise DataError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.folder, self.weight_map = folder, weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> np.ndarray:
        with self._open(name) as f:
            return f.get_tensor(name).float().numpy()

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name) as f:
            return tuple(f.get_slice(name).get_shape())

    def _open(self, name: str):
        from safetensors import safe_open

        if name not in self.weight_map:
            raise DataError(f"{self.folder}: tensor {name} missing from the safetensors files")
        return safe_open(self.folder / self.weight_map[name], framework="pt")


def write_metadata(writer, shape: LlamaShape, name: str, type_name: str) -> None:
    """The general.* and llama.* keys llama.cpp reads for this architecture."""
    import gguf

    writer.add_string("general.type", "model")
    writer.add_string("general.name", name)
    writer.add_uint32("general.file_type", int(gguf.LlamaFileType[GGUF_TYPES[type_name][1]]))
    writer.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    keys = {
        "vocab_size": shape.vocab_size,
        "context_length": shape.context_length,
        "embedding_length": shape.hidden_size,
        "block_count": shape.num_layers,
        "feed_forward_length": shape.intermediate_size,
        "attention.head_count": shape.num_heads,
        "attention.head_count_kv": shape.num_kv_heads,
        "attention.key_length": shape.head_dim,
        "attention.value_length": shape.head_dim,
        "rope.dimension_count": shape.head_dim,
        "rope.freq_base": shape.rope_theta,  # float32 keys: the two floats
        "attention.layer_norm_rms_epsilon": shape.rms_norm_eps,
    }
    for key, value in keys.items():
        add = writer.add_float32 if isinstance(value, float) else writer.add_uint32
        add(f"llama.{key}", value)


def write_gguf(folder: Path, path: Path, type_name: str, name: str) -> Counter:
    """Write `folder` (a Llama save_pretrained folder) to `path`; returns tensor counts per GGML type."""
    import gguf
    from transformers import AutoConfig

    from pipeline.deploy.gguf_vocab import read_chat_template, write_vocab

    shape = llama_shape(AutoConfig.from_pretrained(folder, local_files_only=True), folder)
    weights = SafetensorsFolder(folder)
    plan = []
    for hf_name, gg_name in tensor_names(shape):
        dims = weights.shape(hf_name)
        qtype = tensor_type(gg_name, dims, type_name)
        plan.append((hf_name, gg_name, dims, qtype))
    writer = gguf.GGUFWriter(path, "llama")
    write_metadata(writer, shape, name, type_name)
    write_vocab(writer, folder, shape.vocab_size, read_chat_template(folder))
    for _, gg_name, dims, qtype in plan:
        stored, dtype, nbytes = stored_layout(dims, qtype)
        writer.add_tensor_info(gg_name, stored, dtype, nbytes, raw_dtype=None if dtype != np.uint8 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, gg_name, _, qtype in plan:  # one tensor in memory at a time
        array = weights.get(hf_name)
        if gg_name.endswith(".attn_q.weight"):
            array = rope_permute(array, shape.num_heads)
        elif gg_name.endswith(".attn_k.weight"):
            array = rope_permute(array, shape.num_kv_heads)
        writer.write_tensor_data(encode(array, qtype))
    writer.close()
    return Counter(qtype.name for *_, qtype in plan)


def stored_layout(dims: tuple[int, ...], qtype) -> tuple[tuple[int, ...], np.dtype, int]:
    """(numpy shape, numpy dtype, bytes) of a tensor as `encode` returns it."""
    from gguf import GGMLQuantizationType, quant_shape_to_byte_shape

    floats = {GGMLQuantizationType.F32: np.dtype(np.float32), GGMLQuantizationType.F16: np.dtype(np.float16)}
    if qtype in floats:
        return dims, floats[qtype], int(np.prod(dims)) * floats[qtype].itemsize
    stored = quant_shape_to_byte_shape(dims, qtype)
    return stored, np.dtype(np.uint8), int(np.prod(stored))


@contextlib.contextmanager
def model_folder(source: Path, scratch: Path) -> Iterator[Path]:
    """The Hugging Face folder of `source`: itself; a fine-tuning run's `hf/` export; or for a
    pretraining run folder its latest checkpoint exported by export_hf (in the training precision:
    the weights the training forward used, checked against its recorded logits) into a temporary
    folder under `scratch`."""
    source = Path(source)
    for folder in (source, source / "hf"):
        if (folder / "config.json").is_file():
            if folder != source:
                log.info("%s: using the run's exported model %s", source, folder)
            yield folder
            return
    if not (source / "config.yaml").is_file():
        raise DataError(
            f"{source}: neither a Hugging Face folder (config.json) nor a run folder (config.yaml)"
        )
    from pipeline.train.export import export_hf

    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "gguf-src.", dir=scratch))
    try:
        yield export_hf(source, tmp / "hf")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_gguf(
    source: Path, out: Path, type_name: str = "f16", *, name: str | None = None, verify: bool = True
) -> dict:
    """Write `source` (HF folder or run folder) as the GGUF file `out`; returns a report dict.

    The file appears only after it is complete and, with `verify`, after transformers' GGUF loader
    reproduces the source's logits within GGUF_TOL[type_name].
    """
    require("gguf", "type")
    if type_name not in GGUF_TYPES:
        raise ConfigError(
            "type",
            f"{type_name!r} is not one of {sorted(GGUF_TYPES)} (for K-quants, export f16 and run "
            "llama.cpp's llama-quantize on it)",
        )
    out = Path(out)
    if out.is_dir():
        raise ConfigError("out", f"{out} is a folder; give the GGUF file's path")
    out.parent.mkdir(parents=True, exist_ok=True)
    with model_folder(source, out.parent) as folder:
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + out.name + ".", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            counts = write_gguf(folder, tmp, type_name, name or Path(source).resolve().name)
            parity = check_gguf(tmp, folder, type_name) if verify else {}
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it owner-only; a model file is for sharing
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    report = {"gguf": str(out), "type": type_name, "bytes": out.stat().st_size, "tensor_types": dict(counts)}
    log.info("wrote %s (%s, %.1f MB): %s %s", out, type_name, report["bytes"] / 1e6, dict(counts), parity)
    return {**report, **parity}


def probe_ids(vocab_size: int, context: int) -> torch.Tensor:
    """A fixed (2, T) batch of token ids, T <= 64, spread over the vocabulary."""
    T = min(64, context)
    ids = (torch.arange(2 * T) * 7919 + 13) % vocab_size
    return ids.view(2, T)


@torch.no_grad()
def check_gguf(path: Path, folder: Path, type_name: str) -> dict:
    """Load `path` with transformers' GGUF reader and compare its logits with the folder's model.

    Returns {max_abs_diff, tolerance, top1_agreement}; CheckpointError beyond GGUF_TOL[type_name].
    """
    from transformers import AutoModelForCausalLM

    path, folder = Path(path), Path(folder)
    ref_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    ids = probe_ids(ref_model.config.vocab_size, ref_model.config.max_position_embeddings)
    want = ref_model.eval()(input_ids=ids).logits.float()
    del ref_model
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    got = model.eval()(input_ids=ids).logits.float()
    diff = float((got - want).abs().max())
    tol = GGUF_TOL[type_name] * max(1.0, float(want.abs().max()))
    top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    if not diff <= tol:
        raise CheckpointError(
            f"{path}: transformers' GGUF reader gives logits {diff:.3g} away from {folder} "
            f"(tolerance {tol:.3g} for {type_name}, top-1 agreement {top1:.3f}); file not written"
        )
    return {"max_abs_diff": diff, "tolerance": tol, "top1_agreement": top1}
