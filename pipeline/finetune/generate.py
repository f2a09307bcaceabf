"""Text generation from an exported Hugging Face folder: raw, instruction-template or chat prompts.

The prompt is built exactly as in training: `BOS + format_prompt(...)` for the Alpaca template
(see `sft.py`), or the tokenizer's chat template with the generation prompt (`<|assistant|>`) for
chat, so a fine-tuned model sees the tokens it learned to answer. Several prompts are generated
as one left-padded batch. Loading is offline: a model folder never triggers a download.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline.errors import DataError
from pipeline.finetune.sft import format_prompt

log = logging.getLogger(__name__)

Mode = Literal["instruction", "chat", "raw"]


@dataclass(frozen=True)
class Prompt:
    """One prompt: the text (instruction, user message or raw text), an optional input block, or a
    whole conversation (`messages`, chat mode; the model answers the last user turn)."""

    text: str = ""
    input: str = ""
    messages: tuple[tuple[str, str], ...] = ()


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) from a save_pretrained folder, without network access; with
    the folder's `adapter/` (a prefix- or prompt-tuning export) attached through peft."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    from pipeline.finetune.adapters import ADAPTER_DIR, attach_adapter

    if (model_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        model = attach_adapter(model, model_dir / ADAPTER_DIR)
    return model.eval(), tokenizer


def prompt_ids(
    tokenizer, prompt: str | Prompt, *, instruction: bool = True, input: str = "", mode: Mode | None = None
) -> list[int]:
    """Token ids fed to the model for one prompt. `mode` wins over the older `instruction` flag."""
    p = prompt if isinstance(prompt, Prompt) else Prompt(prompt, input)
    mode = mode or ("instruction" if instruction else "raw")
    if mode == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("chat mode needs a tokenizer with a chat_template (tokenizer_config.json)")
        msgs = [{"role": r, "content": c} for r, c in p.messages] or [
            {"role": "user", "content": f"{p.text}\n\n{p.input}" if p.input.strip() else p.text}
        ]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)  # the template writes BOS itself
    text = format_prompt(p.text, p.input) if mode == "instruction" else p.text
    return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)


def read_prompts(path: Path) -> list[Prompt]:
    """Prompts from a file: JSONL objects ({prompt|instruction, input?} or {messages}), else one per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return [Prompt(ln) for ln in lines]
    out = []
    for lineno, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            msgs = tuple((m["role"], m["content"]) for m in rec.get("messages", []))
            out.append(
                Prompt(rec.get("prompt", rec.get("instruction", "")), rec.get("input", "") or "", msgs)
            )
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
            raise DataError(f"{path}:{lineno}: not a prompt object ({exc})") from None
    return out


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: list[str | Prompt],
    *,
    mode: Mode = "instruction",
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> list[str]:
    """Sample completions for several prompts at once (left-padded); greedy when temperature is 0."""
    rows = [prompt_ids(tokenizer, p, mode=mode) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows])  # (B, T), left-padded
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    torch.manual_seed(seed)  # sampling draws from torch's global generator
    sampling = temperature > 0
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    return [tokenizer.decode(row[T:], skip_special_tokens=True).strip() for row in out]  # new tokens only


def generate(
    model,
    tokenizer,
    prompt: str,
    *,
    instruction: bool = True,
    input: str = "",
    chat: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """Sample one completion and return only the new text."""
    mode: Mode = "chat" if chat else ("instruction" if instruction else "raw")
    return generate_batch(
        model,
        tokenizer,
        [Prompt(prompt, input)],
        mode=mode,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )[0]


def run_cli(args) -> None:
    """What launch/generate.py does with its parsed arguments: print completions."""
    model, tokenizer = load_model(args.model)
    mode: Mode = "chat" if args.chat else ("raw" if args.raw else "instruction")
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.prompt is not None:
        print(
            generate_batch(
                model, tokenizer, [Prompt(args.prompt, args.input)], mode=mode, seed=args.seed, **settings
            )[0]
        )
        return
    prompts = read_prompts(args.prompts_file)
    for start in range(0, len(prompts), max(args.batch_size, 1)):
        chunk = prompts[start : start + args.batch_size]
        outs = generate_batch(model, tokenizer, chunk, mode=mode, seed=args.seed + start, **settings)
        for p, text in zip(chunk, outs):
            shown = p.text or (p.messages[-1][1] if p.messages else "")
            print(json.dumps({"prompt": shown, "completion": text}, ensure_ascii=False), flush=True)
