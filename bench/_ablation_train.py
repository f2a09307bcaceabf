"""The training half of bench/ablation.py: one small Llama per (row, seed), the same plain PyTorch
loop for every row, then the loss on held-out Wikipedia text.

It needs only torch, transformers and numpy (no Ray, no data-prep libraries), so the token files
`prep` wrote can be trained on any machine: `python bench/ablation.py train --out DIR`. The loop is
deliberately ours and minimal (AdamW, linear warm-up, cosine decay, clipping, fp32 everywhere, so a
GPU run computes what a CPU run does) so that it does not move when the real trainer is rewritten; every row gets
exactly the same loop, model, token budget and evaluation, which is what the comparison needs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline.model.build import build_model
from pipeline.model.config import ModelConfig


@dataclass(frozen=True)
class TrainSize:
    """Model and budget of every ablation run (see SIZES and the README of bench/ablation.py)."""

    hidden: int
    layers: int
    heads: int
    seq_len: int
    batch: int
    tokens: int
    """Training tokens per run, the same for every row (small rows are repeated, big ones subsampled)."""
    lr: float = 3e-3
    eval_tokens: int = 60_000
    """Held-out tokens scored per language (at most; windows of seq_len)."""

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch * self.seq_len))


SIZES = {
    # development: seconds per run
    "tiny": TrainSize(hidden=64, layers=2, heads=4, seq_len=128, batch=8, tokens=40_000, eval_tokens=8_000),
    # the table: 1.4 M parameters (0.5 M of them the tied 4k-piece embedding), ~10 MFLOP per token
    # with backward; 600 k tokens (146 steps) per run = 6e12 FLOP, about a minute on 2 quiet CPU
    # cores, so 7 rows x 3 seeds (+ a few minutes of data prep) fit in 40 minutes. At a fixed
    # budget a smaller model seeing more tokens separates the rows better: at 73 steps every row's
    # English loss was the same (a 2.5 M model had only learned unigram statistics).
    "full": TrainSize(hidden=128, layers=4, heads=4, seq_len=256, batch=16, tokens=600_000),
    # the same model 10x longer (GPU): do the rows keep their order once small sets repeat?
    "long": TrainSize(hidden=128, layers=4, heads=4, seq_len=256, batch=16, tokens=3_000_000),
}


def _lr(step: int, size: TrainSize) -> float:
    warm = max(1, size.steps // 20)
    if step < warm:
        return size.lr * (step + 1) / warm
    progress = (step - warm) / max(1, size.steps - warm)
    return size.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_and_eval(
    train: np.ndarray, evals: dict[str, np.ndarray], vocab: int, seed: int, size: TrainSize
) -> dict:
    """Train from scratch on random windows of `train` (seeded), return held-out loss per eval set."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    mcfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=size.hidden,
        num_layers=size.layers,
        num_heads=size.heads,
        max_seq_len=size.seq_len,
    )
    model = build_model(mcfg, bos_id=1, eos_id=2, pad_id=3, partitioned=False).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=size.lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.from_numpy(train.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(size.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, size)
        starts = torch.randint(0, len(data) - size.seq_len - 1, (size.batch,), generator=gen)
        x = torch.stack([data[s : s + size.seq_len + 1] for s in starts.tolist()]).to(device)  # (B, T+1)
        loss = _loss(model, x, device, reduction="mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    result = {name: evaluate(model, toks, size, device) for name, toks in evals.items()}
    return {
        "eval": result,
        "train_loss_last": float(np.mean(losses[-20:])),
        "steps": size.steps,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - start, 1),
        "device": device.type,
        "size": asdict(size),
    }


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, size: TrainSize, device: torch.device) -> dict:
    """Mean next-token loss (nats) over `eval_tokens` worth of non-overlapping windows of `tokens`,
    spread evenly over the whole set (not its first documents), and the number of tokens scored."""
    model.eval()
    n_all = (len(tokens) - 1) // size.seq_len
    picks = np.unique(
        np.linspace(0, n_all - 1, min(n_all, max(1, size.eval_tokens // size.seq_len))).astype(int)
    )
    total, count = 0.0, 0
    for i in range(0, len(picks), size.batch):
        rows = [tokens[j * size.seq_len : (j + 1) * size.seq_len + 1] for j in picks[i : i + size.batch]]
        x = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
        total, count = total + _loss(model, x, device, reduction="sum").item(), count + x[:, 1:].numel()
    model.train()
    return {"loss": total / max(count, 1), "tokens": count}


def _loss(model, x: torch.Tensor, device: torch.device, reduction: str) -> torch.Tensor:
    """Next-token cross entropy of windows x (B, T+1), computed here (not by the HF head) so every
    transformers version scores the same way."""
    logits = model(input_ids=x[:, :-1]).logits  # (B, T, vocab)
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction=reduction
    )
