"""Parameter-efficient fine-tuning through peft: LoRA, QLoRA, prefix tuning, prompt tuning and IA3.

`apply_peft` freezes every base weight and adds the method's parameters: LoRA's `B @ A` beside each
target Linear (scaled by alpha / r), IA3's learned scaling vectors on keys, values and the MLP
input, prefix tuning's per-layer key/value prefixes, prompt tuning's virtual input embeddings.
For classification the new `score` head trains too (peft's SEQ_CLS task puts it in
`modules_to_save`). The wrapped model goes into the same DeepSpeed engine as full fine-tuning
(only trainable parameters reach the optimizer, and only they are checkpointed: the frozen ones
are the starting weights), so `load_adapter_state` rebuilds the peft model from the starting
weights and a consolidated checkpoint for export.

Export: LoRA and IA3 fold into the weights (`merge_checked`: a plain transformers model whose
logits equal the adapter model's); prefix and prompt tuning cannot be folded, so `write_unmerged`
writes the untouched base model and the adapter folder and `check_unmerged` checks that
`PeftModel.from_pretrained(base, adapter)` gives the trained model's logits. QLoRA is LoRA on a
4-bit bitsandbytes base; bitsandbytes needs CUDA, so `require_qlora` refuses it elsewhere.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

from pipeline.errors import CheckpointError, ConfigError
from pipeline.finetune.config import PeftSection
from pipeline.io import atomic_dir

log = logging.getLogger(__name__)

Method = Literal["lora", "qlora", "prefix", "prompt", "ia3"]
MERGEABLE = ("lora", "ia3")  # methods whose parameters fold into the base weights
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]  # the IA3 paper's keys, values and MLP input
MLP_INPUTS = ("down_proj",)  # IA3 rescales these modules' input (the MLP's hidden activation)
ADAPTER_DIR = "adapter"
"""An export's adapter folder: `<run dir>/adapter` beside a merged model, `<out>/adapter` inside an
unmerged one (the base model), where generate.py's load_model finds it."""


def _task_type(task: str):
    from peft import TaskType

    return TaskType.SEQ_CLS if task == "classify" else TaskType.CAUSAL_LM


def _lora(section: PeftSection, task: str):
    from peft import LoraConfig

    return LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules or LORA_TARGETS),
        task_type=_task_type(task),
        bias="none",
    )


def _ia3(section: PeftSection, task: str):
    from peft import IA3Config

    targets = list(section.target_modules or IA3_TARGETS)
    ff = section.feedforward_modules
    ff = [t for t in targets if t in MLP_INPUTS] if ff is None else list(ff)
    if set(ff) - set(targets):
        raise ConfigError(
            "peft.feedforward_modules", f"{sorted(set(ff) - set(targets))} are not among the targets"
        )
    return IA3Config(target_modules=targets, feedforward_modules=ff, task_type=_task_type(task))


def _prefix(section: PeftSection, task: str):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        num_virtual_tokens=section.num_virtual_tokens,
        prefix_projection=section.prefix_projection,
        task_type=_task_type(task),
    )


def _prompt(section: PeftSection, task: str):
    from peft import PromptTuningConfig, PromptTuningInit

    # SAMPLE_VOCAB starts from embeddings of random vocabulary tokens (no tokenizer download needed)
    return PromptTuningConfig(
        num_virtual_tokens=section.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
        task_type=_task_type(task),
    )


PEFT_CONFIGS = {"lora": _lora, "qlora": _lora, "prefix": _prefix, "prompt": _prompt, "ia3": _ia3}


def peft_config(method: Method, section: PeftSection, task: str):
    """The peft config of a method for a task ('sft'/'dpo': causal LM; 'classify': sequence classification)."""
    if method not in PEFT_CONFIGS:
        raise ConfigError("method", f"must be one of {['full', *PEFT_CONFIGS]}, got {method!r}")
    return PEFT_CONFIGS[method](section, task)


def require_qlora() -> None:
    """ConfigError unless bitsandbytes can run here (it needs a CUDA GPU and the package)."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "method",
            "qlora keeps the base model in 4 bits with bitsandbytes, which needs a CUDA GPU, and this "
            "machine has none; use method: lora here, or run on a GPU node",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("method", "qlora needs the bitsandbytes package: pip install bitsandbytes")


def quantization_config(section: PeftSection):
    """The transformers BitsAndBytesConfig the base model of a qlora run is loaded with."""
    require_qlora()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=section.quant_type,
        bnb_4bit_use_double_quant=section.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,  # one storage dtype, so ZeRO-3 can partition the 4-bit weights
    )


def check_supported(model: torch.nn.Module, method: Method, section: PeftSection, task: str) -> None:
    """ConfigError for a method this model cannot take: unknown target modules, or prefix tuning on a
    classifier whose backbone takes no `past_key_values` (peft needs them; transformers 5 renamed them)."""
    if method == "qlora":
        require_qlora()
    if method in ("lora", "qlora", "ia3"):
        cfg = peft_config(method, section, task)
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in cfg.target_modules if t not in names]
        if missing:
            raise ConfigError("peft.target_modules", f"{missing} are not modules of this model")
    if method == "prefix" and task == "classify":
        backbone = getattr(model, model.base_model_prefix, model)
        if "past_key_values" not in inspect.signature(backbone.forward).parameters:
            raise ConfigError(
                "method",
                f"prefix tuning of a classifier: peft passes past_key_values, which {type(backbone).__name__}"
                " does not take (transformers 5 calls it cache); use prompt, lora or ia3 for classify",
            )


def apply_peft(model: torch.nn.Module, method: Method, section: PeftSection, task: str) -> torch.nn.Module:
    """The peft-wrapped model: the method's parameters (and a classification head) train, all else frozen."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_supported(model, method, section, task)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, peft_config(method, section, task))
    if method == "prefix":  # peft hands the prefixes over as past_key_values, which transformers deprecates
        warnings.filterwarnings("ignore", r".*`past_key_values` is deprecated", FutureWarning)
    for p in peft_model.parameters():
        if p.requires_grad and not hasattr(p, "ds_id"):
            p.data = p.data.to(dtype)  # new parameters are born fp32; ZeRO wants one dtype (bf16 runs)
    trainable, total = count_params(peft_model)
    log.info("peft %s: %d of %d parameters train", method, trainable, total)
    return peft_model


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; full shapes even for ZeRO-3 placeholders."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def without_adapters(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """A context in which a peft model computes as its frozen base (e.g. DPO's reference pass)."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else contextlib.nullcontext()


def load_adapter_state(base: torch.nn.Module, method: Method, section: PeftSection, task: str, state: dict):
    """The peft model with a consolidated checkpoint's `state` loaded (`base` holds the starting
    weights; peft adds the method's parameters to it). Every trained parameter must be in `state`;
    frozen ones may be absent (checkpoints of PEFT runs hold only what trains)."""
    peft_model = apply_peft(base, method, section, task)
    result = peft_model.load_state_dict(state, strict=False)
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    missing = [k for k in result.missing_keys if k in trained]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{method} checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return peft_model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def merge_checked(peft_model, probe: torch.Tensor, atol: float = 1e-4) -> torch.nn.Module:
    """Fold LoRA/IA3 parameters into the base weights; CheckpointError unless the merged model's
    logits on `probe` (B, T) token ids match the adapter model's within `atol`."""
    peft_model.eval()
    before = peft_model(input_ids=probe).logits
    merged = peft_model.merge_and_unload()
    diff = _max_diff(before, merged(input_ids=probe).logits)
    if diff > atol:
        raise CheckpointError(f"merged model differs from the adapter model: max |logit diff| {diff:.2e}")
    log.info("merged adapters (max |logit diff| vs adapter model %.1e)", diff)
    return merged


def base_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The frozen base model's weights as plain transformers keys (prefix and prompt tuning leave
    them untouched; a trained classification head lives in the adapter, not here)."""
    state = {}
    for key, value in peft_model.get_base_model().state_dict().items():
        if ".modules_to_save." in key:
            continue
        state[key.replace(".original_module.", ".")] = value
    return state


def save_base(peft_model, out: Path) -> None:
    """Write the base model of a prefix/prompt-tuned model to `out` as a transformers folder."""
    peft_model.get_base_model().save_pretrained(out, state_dict=base_state_dict(peft_model))


@contextlib.contextmanager
def _eval(model: torch.nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def write_unmerged(peft_model, base_dir: Path, adapter_dir: Path) -> None:
    """Write the untouched base model to `base_dir` and the adapter (peft's layout) to `adapter_dir`."""
    save_base(peft_model, base_dir)
    peft_model.save_pretrained(adapter_dir)


def attach_adapter(base: torch.nn.Module, adapter_dir: Path):
    """`base` with the adapter folder written by `write_unmerged` (a peft model in eval mode)."""
    from peft import PeftModel

    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(base, adapter_dir).eval()


@torch.no_grad()
def check_unmerged(
    peft_model, base_dir: Path, adapter_dir: Path, probe: torch.Tensor, atol: float = 1e-5
) -> float:
    """Max |logit diff| on `probe` between the trained model and `base_dir` + `adapter_dir` reloaded;
    CheckpointError beyond `atol`."""
    with _eval(peft_model):
        want = peft_model(input_ids=probe).logits
    base = type(peft_model.get_base_model()).from_pretrained(base_dir, local_files_only=True)
    diff = _max_diff(want, attach_adapter(base.to(want.dtype), adapter_dir)(input_ids=probe).logits)
    if diff > atol:
        raise CheckpointError(
            f"{adapter_dir}: base + adapter reloaded differ from the trained model: max |logit diff| {diff:.2e}"
        )
    return diff


def export_unmerged(
    peft_model, base_out: Path, adapter_out: Path, probe: torch.Tensor, atol: float = 1e-5
) -> None:
    """Write the base model to `base_out` and the adapter to `adapter_out` (both atomically);
    CheckpointError unless `PeftModel.from_pretrained` of the two gives the trained model's logits."""
    with atomic_dir(base_out) as base_tmp, atomic_dir(adapter_out) as adapter_tmp:
        write_unmerged(peft_model, base_tmp, adapter_tmp)
        diff = check_unmerged(peft_model, base_tmp, adapter_tmp, probe, atol)
    log.info("exported base %s and adapter %s (max |logit diff| %.1e)", base_out, adapter_out, diff)


def pad_left(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A right-padded (B, T) batch with its padding moved to the left of each row.

    Prompt tuning hands a classifier embeddings instead of token ids, so transformers cannot find
    the last real token and pools the last position: with left padding that is every row's EOS.
    Rotary positions are relative, so the shift changes attention scores only by rounding."""
    lengths = batch["attention_mask"].sum(-1, keepdim=True)  # (B, 1)
    T = batch["attention_mask"].shape[-1]
    index = (torch.arange(T).unsqueeze(0) - (T - lengths)) % T  # out[j] = in[j - shift]
    out = dict(batch)
    for key in ("input_ids", "attention_mask"):
        out[key] = batch[key].gather(1, index)
    return out
