"""Text generation from an exported Hugging Face folder, with the SFT prompt template.

The prompt is built exactly as in training (`BOS + format_prompt(...)`, see `sft.py`), so a
fine-tuned model sees the same tokens it learned to answer. Loading is offline: a model
folder never triggers a download.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.errors import DataError
from pipeline.finetune.sft import format_prompt

log = logging.getLogger(__name__)


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) from a save_pretrained folder, without network access."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer


def prompt_ids(tokenizer, prompt: str, *, instruction: bool = True, input: str = "") -> list[int]:
    """Token ids fed to the model: BOS + the templated prompt (or the raw text when not `instruction`)."""
    text = format_prompt(prompt, input) if instruction else prompt
    return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: str,
    *,
    instruction: bool = True,
    input: str = "",
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """Sample a completion (greedy when temperature is 0) and return only the new text."""
    ids = torch.tensor([prompt_ids(tokenizer, prompt, instruction=instruction, input=input)])
    torch.manual_seed(seed)  # sampling draws from torch's global generator
    sampling = temperature > 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    new = out[0, ids.shape[1] :]  # (new_tokens,)
    return tokenizer.decode(new, skip_special_tokens=True).strip()
