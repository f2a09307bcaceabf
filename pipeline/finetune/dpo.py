"""DPO: batches of preference pairs, per-sequence log-probabilities, the loss, reward metrics, and
the reference log-probabilities computed once before training.

A batch holds B pairs as 2B rows, the chosen sequences first (one forward for both sides). The
policy's log-probability of an answer is the sum of log p(token) over its labelled tokens (the
answer and its EOS, never the prompt); the reference's comes from the starting model, computed
once over the whole dataset by `reference_logps` and stored beside the run by `save_reference`, so
no second model sits in memory while training. With r = beta x (policy - reference) log-prob:
- sigmoid (DPO): loss = -log sigmoid(r_chosen - r_rejected);
- ipo (IPO): loss = (m - 1 / (2 beta))^2 with m the difference of per-token log-ratios, as TRL
  computes it (a length-free target margin).
Rewards r, their accuracy (share of pairs with r_chosen > r_rejected) and margin are the metrics.
Data comes from preferences.py; tests/test_finetune_dpo.py checks loss and log-probs against TRL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import dist
from pipeline.errors import CheckpointError, ConfigError
from pipeline.finetune import sft
from pipeline.finetune.config import DPOSection
from pipeline.finetune.preferences import Pair
from pipeline.io import atomic_write

log = logging.getLogger(__name__)

IGNORE_INDEX = sft.IGNORE_INDEX
REFERENCE_FORMAT = "gristmill-dpo-reference"
REFERENCE_VERSION = 1
REFERENCE_NAME = "dpo_reference.pt"
STAT_NAMES = (
    "pairs",
    "reward_chosen",
    "reward_rejected",
    "reward_accuracy",
    "reward_margin",
    "logp_chosen",
    "logp_rejected",
)


# ---------------------------------------------------------------- batches


def collate_pairs(pairs: list[Pair], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """(2B, seq_len) input_ids/labels/attention_mask, chosen rows then rejected rows; (B,) `pair_mask`
    (1 for real pairs) and, once attached, (B,) float64 `ref_chosen`/`ref_rejected`.

    An empty list gives one padding pair with pair_mask 0 (a rank with nothing left to evaluate
    still joins ZeRO-3's collective forward)."""
    real = len(pairs)
    if not pairs:
        empty = sft.Encoded([pad_id], [IGNORE_INDEX])
        pairs = [Pair(empty, empty, "", 0.0, 0.0)]
    batch = sft.collate([p.chosen for p in pairs] + [p.rejected for p in pairs], seq_len, pad_id)
    batch["pair_mask"] = torch.tensor([1.0] * real + [0.0] * (len(pairs) - real))
    if all(p.ref_chosen is not None for p in pairs):
        batch["ref_chosen"] = torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float64)
        batch["ref_rejected"] = torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float64)
    return batch


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    """Loss terms in a batch: real pairs (what the loop normalises the summed loss by)."""
    return int(batch["pair_mask"].sum())


# ---------------------------------------------------------------- log-probs, loss, metrics


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) fp32 sums of log p(label) over each row's labelled tokens, and (N,) their counts.

    logits (N, T', V) with T' >= T = labels.shape[1]: prompt tuning puts its virtual tokens first,
    so the last T positions are the sequence's. Position t predicts label t + 1 (the causal shift)."""
    logits = logits[:, -labels.shape[1] :]
    targets = labels[:, 1:].to(logits.device)  # (N, T-1)
    token_logps = -F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    mask = targets != IGNORE_INDEX
    return (token_logps * mask).sum(-1), mask.sum(-1)


def _sigmoid(chosen_ratio, rejected_ratio, chosen_tokens, rejected_tokens, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))


def _ipo(chosen_ratio, rejected_ratio, chosen_tokens, rejected_tokens, beta: float) -> torch.Tensor:
    # per-token log-ratios: with sums the target margin 1/(2 beta) would mean less for longer answers
    margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
    return (margin - 1 / (2 * beta)) ** 2


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"sigmoid": _sigmoid, "ipo": _ipo}


def preference_loss(
    policy: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor],
    tokens: tuple[torch.Tensor, torch.Tensor],
    beta: float,
    loss: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the rewards beta x log-ratio of chosen and rejected (B,), detached.

    Each argument pair is (chosen, rejected): policy and reference log-prob sums, answer token counts."""
    if loss not in LOSSES:
        raise ConfigError("dpo.loss", f"must be one of {list(LOSSES)}, got {loss!r}")
    chosen_ratio = policy[0] - reference[0].to(policy[0])
    rejected_ratio = policy[1] - reference[1].to(policy[1])
    losses = LOSSES[loss](chosen_ratio, rejected_ratio, *tokens, beta)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_loss_sum(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], cfg: DPOSection
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's summed loss over real pairs (the loop divides by the step's pair count) and its
    (len(STAT_NAMES),) float64 metric sums, from the policy's (2B, T, V) logits."""
    if "ref_chosen" not in batch:
        raise CheckpointError("DPO batch without reference log-probs: attach them first (attach_reference)")
    logps, tokens = sequence_logps(logits, batch["labels"])
    B = batch["pair_mask"].shape[0]
    mask = batch["pair_mask"].to(logps.device)
    reference = (batch["ref_chosen"].to(logps.device), batch["ref_rejected"].to(logps.device))
    losses, r_chosen, r_rejected = preference_loss(
        (logps[:B], logps[B:]), reference, (tokens[:B], tokens[B:]), cfg.beta, cfg.loss
    )
    per_pair = [mask, r_chosen, r_rejected, (r_chosen > r_rejected).float(), r_chosen - r_rejected]
    per_pair += [logps[:B].detach(), logps[B:].detach()]
    stats = torch.stack([(x.double() * mask).sum() for x in per_pair])  # on the device: no sync here
    return (losses * mask).sum(), stats


def preference_metrics(stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Means per pair of summed stats (after the loop's sum over micro batches and ranks)."""
    pairs = float(stats[0])
    means = {name: float(v) / max(pairs, 1.0) for name, v in zip(STAT_NAMES[1:], stats[1:])}
    return {f"{prefix}{k}": v for k, v in {"pairs": pairs, **means}.items()}


# ---------------------------------------------------------------- the reference pass and its file


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    pairs: list[Pair],
    *,
    micro_size: int,
    seq_len: int,
    pad_id: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    replicas: int = 1,
) -> torch.Tensor:
    """(N, 2) float64 [chosen, rejected] log-prob sums of every pair under `model` (the frozen starting
    model: for peft, call it inside `adapters.without_adapters`). Each rank scores its share, in the
    same number of forwards on every rank (ZeRO-3 needs that); a sum over ranks completes the table
    (`replicas`: ranks that score the same share, the tensor-parallel size)."""
    table = torch.zeros(len(pairs), 2, dtype=torch.float64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        batches = sft.eval_micro_batches(
            list(range(len(pairs))), micro_size=micro_size, dp_rank=dp_rank, dp_size=dp_size
        )
        for index in batches:
            batch = collate_pairs([pairs[i] for i in index], seq_len, pad_id)
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
            logps, _ = sequence_logps(model(**inputs).logits, batch["labels"])
            if index:  # else a padding pair, run only to join the collective forward
                B = len(index)
                table[index] = torch.stack([logps[:B], logps[B:]], dim=1).double().cpu()
    finally:
        model.train(was_training)
    return dist.all_reduce_sum_(table) / replicas


def reference_path(run_dir: Path, cfg: DPOSection) -> Path:
    """Where the reference log-probs of a run live: `dpo.reference_file`, else beside the run."""
    return Path(cfg.reference_file) if cfg.reference_file is not None else Path(run_dir) / REFERENCE_NAME


def save_reference(path: Path, pairs: list[Pair], table: torch.Tensor, meta: dict[str, str]) -> None:
    """Write the table keyed by pair key, sorted (the same data gives the same bytes), atomically.

    `meta` names what the values depend on beyond the tokens (e.g. the starting model's checkpoint
    fingerprint); `load_reference` refuses a file whose meta differs. Plain tensors, strings and
    lists only, so `torch.load(weights_only=True)` reads it."""
    by_key: dict[str, list[float]] = {}
    for pair, row in zip(pairs, table.tolist()):
        by_key.setdefault(pair.key, row)
    keys = sorted(by_key)
    obj = {
        "format": REFERENCE_FORMAT,
        "version": REFERENCE_VERSION,
        "meta": {k: str(meta[k]) for k in sorted(meta)},
        "keys": keys,
        "logps": torch.tensor([by_key[k] for k in keys], dtype=torch.float64).reshape(-1, 2),  # (N, 2)
    }
    with atomic_write(path) as fh:
        torch.save(obj, fh)
    log.info("wrote reference log-probs of %d pairs to %s", len(keys), path)


def load_reference(path: Path, meta: dict[str, str]) -> dict[str, tuple[float, float]]:
    """key -> (chosen, rejected) reference log-probs; CheckpointError naming the file when it is
    unreadable, of another format, or computed for another `meta` (e.g. another starting model)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises many types
        raise CheckpointError(f"{path}: cannot read reference log-probs: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != REFERENCE_FORMAT:
        raise CheckpointError(f"{path}: not a {REFERENCE_FORMAT} file")
    if obj.get("version") != REFERENCE_VERSION:
        raise CheckpointError(f"{path}: version {obj.get('version')}, this code reads {REFERENCE_VERSION}")
    for key, want in meta.items():
        if obj["meta"].get(key) != str(want):
            raise CheckpointError(
                f"{path}: computed for {key}={obj['meta'].get(key)!r}, this run has {want!r}; "
                "delete the file to recompute it"
            )
    return dict(zip(obj["keys"], map(tuple, obj["logps"].tolist())))


def attach_reference(pairs: list[Pair], table: dict[str, tuple[float, float]], path: Path) -> list[Pair]:
    """The pairs with their reference log-probs; CheckpointError when the file lacks some (it was
    computed for other data, another tokenizer, template or seq_len)."""
    missing = [p for p in pairs if p.key not in table]
    if missing:
        raise CheckpointError(
            f"{path}: no reference log-probs for {len(missing)} of {len(pairs)} pairs; it was computed for "
            "other data or tokenization (data.path, template, seq_len): delete it to recompute it"
        )
    return [replace(p, ref_chosen=table[p.key][0], ref_rejected=table[p.key][1]) for p in pairs]


def ensure_reference(
    model: torch.nn.Module,
    pairs: list[Pair],
    path: Path,
    meta: dict[str, str],
    *,
    micro_size: int,
    seq_len: int,
    pad_id: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    replicas: int = 1,
) -> list[Pair]:
    """`pairs` with reference log-probs from `path`, computing and writing it first when absent (every
    rank calls this; the batching arguments are reference_logps').

    Whether the file exists is agreed by a sum over ranks, so ranks that see different filesystems
    fail here instead of diverging (one computing, one loading)."""
    seen = int(dist.sum_floats([float(Path(path).is_file())])[0])
    if 0 < seen < dist.world_size():
        raise CheckpointError(
            f"{path}: visible on {seen} of {dist.world_size()} ranks; put the run on a shared disk"
        )
    if not seen:
        table = reference_logps(
            model,
            pairs,
            micro_size=micro_size,
            seq_len=seq_len,
            pad_id=pad_id,
            dp_rank=dp_rank,
            dp_size=dp_size,
            replicas=replicas,
        )
        if dist.is_main():
            save_reference(path, pairs, table, meta)
        dist.barrier()
    return attach_reference(pairs, load_reference(path, meta), path)
