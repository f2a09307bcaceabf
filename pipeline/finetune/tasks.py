"""Fine-tuning tasks of the shared training loop, found by name (`task:` in a fine-tuning config).

Each is its data, its loss and its metrics (pipeline/runtime/task.py): `sft` trains the next-token
loss on the answer tokens of instruction/chat records (prompts masked, optionally packed),
`classify` a sequence-classification head on labelled texts (loss per example; accuracy and macro
F1), and `dpo` the DPO (or IPO) loss on preference pairs against reference log-probabilities the
starting model gives once, before training (`DPOTask.setup`; rewards, their accuracy and margin
are its metrics). The data is encoded once, the same on every rank; step s takes global batch s of
a seeded per-epoch permutation and each rank its slice of it, so batches depend on the step alone
and never on the world size. A new task is a class here and a line in TASKS.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import dist
from pipeline.config import config_hash
from pipeline.errors import DataError
from pipeline.finetune import adapters, baselines, class_report, classify, dpo, preferences, sft
from pipeline.finetune.config import FinetuneConfig
from pipeline.io import atomic_write, sha256_file
from pipeline.runtime import checkpoint
from pipeline.runtime.engine import IGNORE_INDEX, Engine
from pipeline.runtime.metrics import MetricsWriter
from pipeline.runtime.task import Batch, Task, count_lm_targets, evaluate_lm, lm_loss_sum

log = logging.getLogger(__name__)


class FinetuneTask(Task):
    """Encoded train/valid splits, batched by step; subclasses add the loss and the metrics."""

    init_dir: Path | None = None
    """The starting weights' folder, whose tokenizer encoded the data (export copies it)."""

    def __init__(self, cfg: FinetuneConfig, train: list, valid: list, pad_id: int, info: dict):
        self.cfg, self.train, self.valid, self.pad_id, self.info = cfg, train, valid, pad_id, info
        self.seq_len = cfg.data.seq_len
        # The file and every setting that changes the encoded rows or their order.
        self.fingerprint = hashlib.sha256(
            f"{sha256_file(cfg.data.path)}/{cfg.task}/{config_hash(cfg.data)}".encode()
        ).hexdigest()
        if sft.steps_per_epoch(len(train), cfg.batch.global_size) < 1:
            raise DataError(
                f"{cfg.data.path}: {len(train)} usable train sequences, fewer than one global batch "
                f"(batch.global_size={cfg.batch.global_size})"
            )

    @classmethod
    def build(cls, cfg: FinetuneConfig, tokenizer) -> FinetuneTask:
        """The task with its data loaded, split and encoded."""
        raise NotImplementedError

    def collate(self, items: list) -> Batch:
        raise NotImplementedError

    def _step_items(self, data: list, step: int, dp_rank: int, dp_size: int) -> list[list]:
        b = self.cfg.batch
        return sft.train_micro_batches(
            data,
            step=step,
            global_size=b.global_size,
            micro_size=b.micro_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=self.cfg.data.seed,
        )

    def micro_batches(self, step: int, dp_rank: int, dp_size: int) -> list[Batch]:
        return [self.collate(items) for items in self._step_items(self.train, step, dp_rank, dp_size)]

    def step_samples(self, step: int) -> list[int]:
        """Train-split indices of the step's examples (packed rows for packed SFT)."""
        return [i for chunk in self._step_items(list(range(len(self.train))), step, 0, 1) for i in chunk]

    def eval_batches(self, engine: Engine):
        """This rank's valid batches (every rank the same number; `eval_max_batches` caps them)."""
        b, cap = self.cfg.batch, self.cfg.train.eval_max_batches
        chunks = sft.eval_micro_batches(
            self.valid, micro_size=b.micro_size, dp_rank=engine.dp_rank, dp_size=engine.dp_size
        )
        for i, items in enumerate(chunks):
            if cap is not None and i >= cap:
                break
            yield self.collate(items)


class SFTTask(FinetuneTask):
    """Next-token loss on the response tokens of instruction/chat examples."""

    name = "sft"

    @classmethod
    def build(cls, cfg: FinetuneConfig, tokenizer) -> SFTTask:
        """Instruction/chat records -> encoded (and, with data.pack, packed) train and valid sequences."""
        examples, bad = sft.load_examples(cfg.data.path)
        if cfg.data.template == "chat" or any(isinstance(e, sft.Chat) for e in examples):
            sft.check_chat_template(tokenizer, cfg.data.path)
        train_ex, valid_ex = sft.split_examples(examples, cfg.data.valid_fraction, cfg.data.seed)
        train, train_counts = sft.encode_examples(tokenizer, train_ex, cfg.data.seq_len, cfg.data.template)
        valid, valid_counts = sft.encode_examples(tokenizer, valid_ex, cfg.data.seq_len, cfg.data.template)
        counts = {"records": len(examples), **dict(bad + train_counts + valid_counts)}
        if cfg.data.pack:
            counts["train_examples_packed"] = len(train)
            train = sft.pack(train, cfg.data.seq_len)  # valid stays unpacked: the same loss, simpler
        info = {"train_examples": len(train), "valid_examples": len(valid), **counts}
        return cls(cfg, train, valid, sft.pad_id_of(tokenizer), info)

    def collate(self, items: list) -> Batch:
        return sft.collate(items, self.seq_len, self.pad_id)

    def count_targets(self, batch: Batch) -> int:
        return count_lm_targets(batch)

    def loss_sum(self, engine: Engine, batch: Batch) -> torch.Tensor:
        return lm_loss_sum(engine, batch)

    def evaluate(self, engine: Engine) -> dict[str, float] | None:
        return evaluate_lm(engine, self.eval_batches(engine)) if self.valid else None


class ClassifyTask(FinetuneTask):
    """Cross-entropy of (B, classes) logits against (B,) labels; accuracy and macro F1.

    Before training, rank 0 fits the baselines on the same train split and scores them on the same
    valid split (metrics.jsonl's `event: data` row); every eval saves its predictions
    (`<run dir>/predictions/step_<N>.jsonl`), from which the metrics are computed, and `finish`
    reports on the exported step's predictions against the baselines.
    """

    name = "classify"
    metric_modes = {"eval_loss": "min", "accuracy": "max", "macro_f1": "max"}

    def __init__(
        self, cfg: FinetuneConfig, train: list, valid: list, pad_id: int, info: dict, labels: list[str]
    ):
        super().__init__(cfg, train, valid, pad_id, info)
        self.labels = labels
        if cfg.classify.head_lr is not None:
            self.lr_scales = {classify.HEAD: cfg.classify.head_lr / cfg.optim.lr}

    @classmethod
    def build(cls, cfg: FinetuneConfig, tokenizer) -> ClassifyTask:
        """Labelled rows -> class names, encoded train/valid examples and (rank 0) the baselines."""
        rows, bad = classify.load_rows(cfg.data.path, cfg.classify)
        train_rows, valid_rows = sft.split_examples(
            rows, cfg.data.valid_fraction, cfg.data.seed, key=lambda r: r.text
        )  # same text, same split
        labels = classify.label_names(cfg.classify, train_rows, cfg.data.path)
        train, train_counts = classify.encode_rows(tokenizer, train_rows, labels, cfg.data.seq_len)
        valid, valid_counts = classify.encode_rows(tokenizer, valid_rows, labels, cfg.data.seq_len)
        counts = {"records": len(rows), **dict(bad + train_counts + valid_counts)}
        info = {"train_examples": len(train), "valid_examples": len(valid), **counts}
        if dist.is_main() and valid:  # the examples encode_rows kept (labels among the classes)
            train_rows, valid_rows = ([r for r in rs if r.label in labels] for rs in (train_rows, valid_rows))
            info |= baselines.baseline_metrics(
                [r.text for r in train_rows],
                [r.label for r in train_rows],
                [r.text for r in valid_rows],
                [r.label for r in valid_rows],
                labels,
                seed=cfg.run.seed,
                tfidf=cfg.classify.tfidf_baseline,
            )
        return cls(cfg, train, valid, sft.pad_id_of(tokenizer), info, labels)

    def collate(self, items: list) -> Batch:
        batch = classify.collate(items, self.seq_len, self.pad_id)
        return adapters.pad_left(batch) if self.cfg.method == "prompt" else batch  # see pad_left

    def count_targets(self, batch: Batch) -> int:
        return classify.target_count(batch)

    def loss_sum(self, engine: Engine, batch: Batch) -> torch.Tensor:
        logits = engine.forward(batch).logits.float()  # (B, classes)
        labels = engine.to_device(batch["labels"])
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")

    def evaluate(self, engine: Engine) -> dict[str, float] | None:
        """eval_loss (per example), accuracy and macro F1 over the valid split (all ranks), computed
        from the predictions it saves on rank 0."""
        if not self.valid:
            return None
        b, cap = self.cfg.batch, self.cfg.train.eval_max_batches
        chunks = sft.eval_micro_batches(
            list(range(len(self.valid))),
            micro_size=b.micro_size,
            dp_rank=engine.dp_rank,
            dp_size=engine.dp_size,
        )
        loss, preds = 0.0, [0.0] * len(self.valid)  # class id + 1 where this rank predicted; 0 elsewhere
        with engine.evaluating():
            for idx in itertools.islice(chunks, cap):
                batch = self.collate([self.valid[i] for i in idx])
                logits = engine.forward(batch).logits.float()  # (B, classes)
                labels = engine.to_device(batch["labels"])
                loss += float(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
                for i, guess in zip(idx, logits.argmax(-1).tolist()):
                    preds[i] = guess + 1.0
        sums = [x / engine.tp_size for x in dist.sum_floats([loss, *preds])]  # TP ranks share batches
        done = [(ex, int(p) - 1) for ex, p in zip(self.valid, sums[1:]) if p > 0]
        if dist.is_main():
            path = classify.predictions_path(self.cfg.run_dir, checkpoint.tag_for(engine.global_steps))
            class_report.write_predictions(
                path,
                [ex.where for ex, _ in done],
                *self._names([ex.label for ex, _ in done], [p for _, p in done]),
            )
        conf = classify.confusion(
            torch.tensor([p for _, p in done]), torch.tensor([ex.label for ex, _ in done]), len(self.labels)
        )
        return {"eval_loss": sums[0] / max(len(done), 1), **classify.scores(conf)}

    def _names(self, *id_lists: list[int]) -> list[list[str]]:
        return [[self.labels[i] for i in ids] for ids in id_lists]

    def finish(self, tag: str) -> None:
        """The classification report of checkpoint `tag`'s saved eval predictions (log, text and PNG
        beside the run) and a metrics.jsonl `event: summary` row with its margins over the baselines."""
        run_dir = self.cfg.run_dir
        path = classify.predictions_path(run_dir, tag)
        if not path.is_file():
            log.warning("%s: not found (no eval at %s), so no classification report", path, tag)
            return
        report = class_report.report_from_predictions(path, self.labels)
        text = class_report.format_report(report)
        with atomic_write(run_dir / "classification_report.txt", "w") as fh:
            fh.write(f"{tag} ({path.name})\n{text}\n")
        title = f"{self.cfg.run.name}, {tag}: {int(report.support.sum())} valid examples"
        class_report.plot_report(report, run_dir / "classification_report.png", title=title)
        step = int(checkpoint.TAG_RE.match(tag).group(1))
        row = {"event": "summary", "step": step, "checkpoint": tag, **report.summary()}
        line = f"{tag}: accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f}"
        if "majority_macro_f1" in self.info:
            row |= baselines.margins(report.macro_f1, self.info)
            line = f"{tag}: " + baselines.verdict(report.macro_f1, self.info)
        writer = MetricsWriter(run_dir, tensorboard=False)
        writer.write(row)
        writer.close()
        log.info("classification report of %s (%s):\n%s", tag, path, text)
        log.info("%s", line)


class DPOTask(FinetuneTask):
    """Preference pairs: the DPO/IPO loss of the policy's answer log-probs against the starting
    model's (computed once in `setup`, stored beside the run); rewards and their margin as metrics."""

    name = "dpo"

    def __init__(self, cfg: FinetuneConfig, train: list, valid: list, pad_id: int, info: dict):
        super().__init__(cfg, train, valid, pad_id, info)
        self._window = torch.zeros(len(dpo.STAT_NAMES), dtype=torch.float64)  # stat sums since the last row
        self._replicas = 1  # ranks that share each batch (the tensor-parallel size; set in setup)

    @classmethod
    def build(cls, cfg: FinetuneConfig, tokenizer) -> DPOTask:
        """Preference records -> encoded train and valid pairs (split by prompt: no prompt in both)."""
        prefs, bad = preferences.load_preferences(cfg.data.path)
        if not prefs:
            raise DataError(f"{cfg.data.path}: no usable preference records (skipped: {dict(bad)})")
        if cfg.data.template == "chat" or any(isinstance(p.chosen, sft.Chat) for p in prefs):
            sft.check_chat_template(tokenizer, cfg.data.path)
        train_p, valid_p = sft.split_examples(
            prefs, cfg.data.valid_fraction, cfg.data.seed, key=preferences.prompt_key
        )
        (train, train_counts), (valid, valid_counts) = (
            preferences.encode_preferences(tokenizer, ps, cfg.data.seq_len, cfg.data.template)
            for ps in (train_p, valid_p)
        )
        counts = {"records": len(prefs), **dict(bad + train_counts + valid_counts)}
        info = {"train_examples": len(train), "valid_examples": len(valid), **counts}
        return cls(cfg, train, valid, sft.pad_id_of(tokenizer), info)

    def setup(self, engine: Engine) -> None:
        """Attach the reference log-probs of every pair: read from the run's reference file, or
        computed by the starting model (peft adapters off) and written there first."""
        self._replicas = engine.tp_size
        path = dpo.reference_path(self.cfg.run_dir, self.cfg.dpo)
        meta = {"init": weights_fingerprint(self.init_dir), "precision": self.cfg.parallel.precision}
        with adapters.without_adapters(engine.module):
            pairs = dpo.ensure_reference(
                engine.module,
                self.train + self.valid,
                path,
                meta,
                micro_size=self.cfg.batch.micro_size,
                seq_len=self.seq_len,
                pad_id=self.pad_id,
                dp_rank=engine.dp_rank,
                dp_size=engine.dp_size,
                replicas=engine.tp_size,
            )
        self.train, self.valid = pairs[: len(self.train)], pairs[len(self.train) :]

    def collate(self, items: list) -> Batch:
        return dpo.collate_pairs(items, self.seq_len, self.pad_id)

    def count_targets(self, batch: Batch) -> int:
        return dpo.pair_count(batch)

    def loss_sum(self, engine: Engine, batch: Batch) -> torch.Tensor:
        loss, stats = dpo.pair_loss_sum(engine.forward(batch).logits, batch, self.cfg.dpo)
        self._window = self._window.to(stats.device) + stats
        return loss

    def train_metrics(self) -> dict[str, float]:
        """Rewards, reward accuracy and margin (means per pair) since the last metrics row."""
        sums = [x / self._replicas for x in dist.sum_floats(self._window.tolist())]
        self._window = torch.zeros_like(self._window)
        metrics = dpo.preference_metrics(torch.tensor(sums, dtype=torch.float64))
        return {k: v for k, v in metrics.items() if k != "pairs"} if sums[0] else {}

    def evaluate(self, engine: Engine) -> dict[str, float] | None:
        """eval_loss (per pair) and the rewards' means over the valid pairs, summed over ranks."""
        if not self.valid:
            return None
        total = torch.zeros(1 + len(dpo.STAT_NAMES), dtype=torch.float64)
        with engine.evaluating():
            for batch in self.eval_batches(engine):
                loss, stats = dpo.pair_loss_sum(engine.forward(batch).logits, batch, self.cfg.dpo)
                total += torch.cat([loss.double().reshape(1), stats]).cpu()
        sums = [x / engine.tp_size for x in dist.sum_floats(total.tolist())]
        metrics = dpo.preference_metrics(torch.tensor(sums[1:], dtype=torch.float64), prefix="eval_")
        return {"eval_loss": sums[0] / max(sums[1], 1.0), **metrics}


def weights_fingerprint(folder: Path) -> str:
    """sha256 of a model folder's config.json and weight files: rank 0 reads them, every rank gets
    the digest (collective)."""
    digest = bytes(32)
    if dist.is_main():
        h = hashlib.sha256()
        for f in sorted(Path(folder).iterdir()):
            if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
                h.update(f.name.encode() + b"\x00" + bytes.fromhex(sha256_file(f)))
        digest = h.digest()
    return bytes(int(x) for x in dist.sum_floats(list(digest))).hex()


TASKS: dict[str, type[FinetuneTask]] = {"sft": SFTTask, "classify": ClassifyTask, "dpo": DPOTask}


def build_task(cfg: FinetuneConfig, init_dir: Path, tokenizer) -> FinetuneTask:
    """The configured task, its data encoded with the tokenizer saved beside the init weights."""
    task = TASKS[cfg.task].build(cfg, tokenizer)
    task.init_dir = init_dir
    log.info("data %s: %s", cfg.data.path, task.info)
    return task
