"""Supervised fine-tuning data: instruction records to masked token sequences, packed or padded.

Records come from `records.py` (Alpaca, self-instruct, ShareGPT or OpenAI chat). An Alpaca
`Example` becomes `BOS + prompt + response + EOS` with `PROMPT_TEMPLATE` (template "alpaca"; a
system prompt goes first, followed by a blank line), or is turned into a (system/)user/assistant
conversation (template "chat"). A `Chat` is rendered with the chat template stored
with the tokenizer (`tokenizer_config.json`, see pipeline/tokenizer/hf.py). Labels copy the input
ids on what the model must answer (the response and its EOS; for chats every assistant turn and
its EOS) and are -100 (ignored by the loss) everywhere else: BOS, prompts, role headers, user and
system turns, padding. Truncations are counted by reason.

Packing (`pack`) concatenates several encoded examples into one row of at most `seq_len` tokens
with `position_ids` restarting at 0 for each example and no attention mask: transformers then
builds a block-diagonal causal mask from the position resets (`find_packed_sequence_indices` in
its masking utils, for the sdpa and eager kernels), so no token attends across examples. Every
example starts with a masked BOS, so the shifted loss never predicts across a boundary either:
packed and unpacked batches give the same loss (tests/test_finetune_sft.py checks it).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline.errors import DataError
from pipeline.finetune.records import (  # noqa: F401  (load_examples, split_examples: re-exported)
    Chat,
    Example,
    Record,
    as_chat,
    load_examples,
    split_examples,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value cross-entropy skips (torch's and transformers' default)
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
Template = Literal["alpaca", "chat"]


def format_prompt(instruction: str, input: str = "", system: str = "") -> str:
    """The prompt the model sees before its answer; shared by training and generation."""
    if input.strip():
        prompt = PROMPT_TEMPLATE.format(instruction=instruction, input=input)
    else:
        prompt = PROMPT_TEMPLATE_NO_INPUT.format(instruction=instruction)
    return f"{system}\n\n{prompt}" if system.strip() else prompt


# ---------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example (unpadded) and its labels, both of the same length; a packed row
    also has `position_ids` (restarting at 0 for each example in it)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None


def check_tokenizer(tokenizer, where: Path) -> None:
    """DataError unless the tokenizer has the BOS and EOS ids every example is framed with."""
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(tokenizer, name, None) is None:
            raise DataError(
                f"{where}: the tokenizer has no {name.removesuffix('_id')} token; SFT needs BOS and EOS"
            )


def encode_example(tokenizer, ex: Example, seq_len: int) -> tuple[Encoded | None, str | None]:
    """Tokenize one Alpaca example; returns (encoded or None, reason: None | 'truncated' | 'prompt_too_long').

    Prompt and response are tokenized separately so the mask boundary is exact. Too-long
    examples lose the end of their response (and EOS); an example whose BOS + prompt leaves no
    room for a single response token is dropped.
    """
    prompt = tokenizer.encode(format_prompt(ex.instruction, ex.input, ex.system), add_special_tokens=False)
    response = tokenizer.encode(ex.output, add_special_tokens=False) + [tokenizer.eos_token_id]
    prompt = [tokenizer.bos_token_id] + prompt
    if len(prompt) >= seq_len:
        return None, "prompt_too_long"
    reason = "truncated" if len(prompt) + len(response) > seq_len else None
    response = response[: seq_len - len(prompt)]
    return Encoded(prompt + response, [IGNORE_INDEX] * len(prompt) + response), reason


def check_chat_template(tokenizer, where: Path) -> None:
    """DataError unless the tokenizer carries a chat template (pipeline.tokenizer writes one)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: the tokenizer has no chat_template; chat data (or data.template=chat) needs one "
            "(tokenizers trained with launch/train_tokenizer.py store it in tokenizer_config.json)"
        )


def render_chat(tokenizer, chat: Chat, train_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The templated text and the character spans the model must produce (assistant content + EOS)
    of the assistant turns at message index `train_from` or later (DPO trains only the response).

    Each assistant span runs from the end of the prefix rendered with the generation prompt (so
    the `<|assistant|>` header is excluded) to the end of that turn, minus the template's trailing
    whitespace; this needs a template whose output for a prefix of the messages is a prefix of
    the full output, which is checked.
    """
    msgs = chat.as_dicts()

    def render(upto: int, gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs[:upto], tokenize=False, add_generation_prompt=gen)

    text, spans = render(len(msgs)), []
    for i, (role, _) in enumerate(chat.messages):
        if role != "assistant" or i < train_from:
            continue
        head, turn = render(i, gen=True), render(i + 1)
        if not (turn.startswith(head) and text.startswith(turn)):
            raise DataError(f"{chat.where}: the chat template does not render message prefixes as prefixes")
        spans.append((len(head), len(turn.rstrip())))
    return text, spans


def encode_chat(
    tokenizer, chat: Chat, seq_len: int, train_from: int = 0
) -> tuple[Encoded | None, str | None]:
    """Tokenize one conversation; labels only on assistant tokens (by character offsets) of messages
    `train_from` on, same reasons as `encode_example`. A token is trained on when it starts inside
    an assistant span."""
    text, spans = render_chat(tokenizer, chat, train_from)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
        for tok, (start, _) in zip(ids, enc["offset_mapping"])
    ]
    reason = "truncated" if len(ids) > seq_len else None
    ids, labels = ids[:seq_len], labels[:seq_len]
    if all(lab == IGNORE_INDEX for lab in labels):
        return None, "prompt_too_long"
    return Encoded(ids, labels), reason


def encode_record(
    tokenizer, ex: Record, seq_len: int, template: Template = "alpaca", train_from: int = 0
) -> tuple[Encoded | None, str | None]:
    """Encode an Alpaca example with its template, or a chat (or an Alpaca example under template
    chat); `train_from` (chats only) is the first message index whose assistant turns are trained."""
    if isinstance(ex, Example) and template == "alpaca":
        return encode_example(tokenizer, ex, seq_len)
    return encode_chat(tokenizer, as_chat(ex), seq_len, train_from)


def encode_examples(
    tokenizer, examples: list[Record], seq_len: int, template: Template = "alpaca"
) -> tuple[list[Encoded], Counter]:
    """Encode every record; counts `truncated` (kept) and `prompt_too_long` (dropped)."""
    return encode_each(
        examples, lambda ex: encode_record(tokenizer, ex, seq_len, template), seq_len, "examples"
    )


def encode_each(
    items: list, encode: Callable[[object], tuple[object | None, str | None]], seq_len: int, what: str
) -> tuple[list, Counter]:
    """Apply `encode` (-> encoded or None, reason or None) to every item; keeps the encoded ones and
    counts the reasons (logged once)."""
    out, counts = [], Counter()
    for item in items:
        enc, reason = encode(item)
        if reason:
            counts[reason] += 1
        if enc is not None:
            out.append(enc)
    if counts:
        log.info("encoded %d %s at seq_len %d: %s", len(out), what, seq_len, dict(counts))
    return out, counts


def pad_id_of(tokenizer) -> int:
    """The padding id: the tokenizer's own, else EOS (padding is masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pack(items: list[Encoded], seq_len: int) -> list[Encoded]:
    """Concatenate examples, in order, into rows of at most `seq_len` tokens (next fit)."""
    rows: list[Encoded] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for it in items:
        if ids and len(ids) + len(it.input_ids) > seq_len:
            rows.append(Encoded(ids, labels, pos))
            ids, labels, pos = [], [], []
        ids, labels = ids + it.input_ids, labels + it.labels
        pos = pos + list(range(len(it.input_ids)))
    if ids:
        rows.append(Encoded(ids, labels, pos))
    return rows


def collate(items: list[Encoded], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to a fixed (B, seq_len) batch: input_ids, labels (-100 on padding), attention_mask.

    Packed rows (with position_ids) get `position_ids` instead of an attention mask: the padding
    is one more segment (positions 0, 1, ...), attended to by nothing else. An empty list gives
    one row with no targets (a rank with nothing left to evaluate still has to join ZeRO-3's
    collective forward); it attends to itself so no row is fully masked.
    """
    if not items:
        return collate([Encoded([pad_id] * seq_len, [IGNORE_INDEX] * seq_len)], seq_len, pad_id)
    B = len(items)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, seq_len), dtype=torch.long)
    position_ids = torch.arange(seq_len).repeat(B, 1)  # (B, T); overwritten for packed rows
    for i, it in enumerate(items):
        n = len(it.input_ids)
        input_ids[i, :n] = torch.tensor(it.input_ids)
        labels[i, :n] = torch.tensor(it.labels)
        attention_mask[i, :n] = 1
        if it.position_ids is not None:
            position_ids[i, :n] = torch.tensor(it.position_ids)
            position_ids[i, n:] = torch.arange(seq_len - n)
    if any(it.position_ids is not None for it in items):
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken on: labels not ignored, after the causal shift (position 0 never is)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------- batching


def steps_per_epoch(num_examples: int, global_size: int) -> int:
    """Optimizer steps in one pass; the last partial global batch is dropped."""
    return num_examples // global_size


def train_micro_batches(
    data: list[Encoded],
    *,
    step: int,
    global_size: int,
    micro_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
) -> list[list[Encoded]]:
    """This rank's micro batches for optimizer step `step` (0-based), over epochs as needed.

    Each epoch is a seeded permutation; global sample g of the step is taken by rank
    `g // micro_size % dp_size`, so the data seen per step does not depend on the world size.
    """
    per_epoch = steps_per_epoch(len(data), global_size)
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(data))
    ids = order[offset * global_size : (offset + 1) * global_size]
    chunks = [ids[i : i + micro_size] for i in range(0, global_size, micro_size)]
    return [[data[j] for j in chunk] for k, chunk in enumerate(chunks) if k % dp_size == dp_rank]


def eval_micro_batches(
    data: list[Encoded], *, micro_size: int, dp_rank: int, dp_size: int
) -> Iterator[list[Encoded]]:
    """This rank's share of the valid split; every rank yields the same number of batches.

    Under ZeRO-3 every forward is a collective, so a rank that runs out yields empty batches
    (the caller turns them into fully padded ones, which add zero loss and zero tokens).
    """
    chunks = [data[i : i + micro_size] for i in range(0, len(data), micro_size)]
    rounds = -(-len(chunks) // dp_size)
    for r in range(rounds):
        k = r * dp_size + dp_rank
        yield chunks[k] if k < len(chunks) else []
