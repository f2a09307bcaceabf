"""Evaluation with lm-evaluation-harness (lm-eval 0.4) on local task files, for a folder or an in-memory model.

Tasks are lm-eval YAML files (`configs/eval/*.yaml` by default). We read them with a safe YAML
loader (so a task file never runs code: no `!function`), resolve relative `data_files` against the
YAML's own folder (lm-eval would resolve them against the working directory), and hand lm-eval
the resulting dicts with its built-in task index turned off. Nothing is downloaded: `dataset_path`
must be a local builder (`json`, `csv`, `parquet`, `text`) with local files.

`evaluate_tasks(model, tokenizer, tasks)` runs on a model already in memory; `TaskEvaluator` runs
it every N steps of the training loop (pretraining's `train.eval_tasks`), with every rank in
lockstep; `evaluate_folder` loads a Hugging Face folder first. Loglikelihood
requests start with BOS, as every document did in pretraining; lm-eval's rolling perplexity
already conditions on BOS.

`write_task_data` makes the two shipped task files from any text: a cloze multiple-choice task
(the true continuation of a text among continuations of other texts, cut by characters, so it
works for languages written without spaces) and a perplexity task (the texts themselves).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.deploy import require
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text"}
FEWSHOT_SEED = 1234  # lm-eval's default


def index_tasks(task_dir: Path) -> dict[str, Path]:
    """Task name (the `task:` key) -> YAML file, for every *.yaml in task_dir."""
    found = {}
    for path in sorted(Path(task_dir).glob("*.yaml")):
        cfg = read_task_yaml(path)
        if isinstance(cfg.get("task"), str):
            found[cfg["task"]] = path
    return found


def read_task_yaml(path: Path) -> dict:
    """A task YAML as a dict (safe loader; DataError names the file when it is not a mapping)."""
    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read task YAML ({exc})") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: a task YAML must be a mapping")
    return cfg


def task_config(spec: str, task_dir: Path) -> dict:
    """The lm-eval config dict of a task given by name (in task_dir) or by YAML path."""
    path = Path(spec)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        names = index_tasks(task_dir)
        if spec not in names:
            raise ConfigError(
                "tasks", f"unknown task {spec!r}; {task_dir} has {sorted(names)} (or give a YAML path)"
            )
        path = names[spec]
    cfg = read_task_yaml(path)
    builder = cfg.get("dataset_path")
    if builder not in LOCAL_BUILDERS:
        raise ConfigError(
            "dataset_path", f"must be a local builder {sorted(LOCAL_BUILDERS)}, got {builder!r}", str(path)
        )
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        raise ConfigError("dataset_kwargs.data_files", "must name the task's local data files", str(path))
    cfg["dataset_kwargs"]["data_files"] = _resolve(files, path.parent)
    return cfg


def _resolve(files, base: Path):
    """data_files (str, list or {split: ...}) with relative paths made absolute against `base`."""
    if isinstance(files, dict):
        return {k: _resolve(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_resolve(v, base) for v in files]
    path = Path(files) if Path(files).is_absolute() else base / files
    if not path.is_file():
        raise DataError(f"{path}: task data file not found")
    return str(path)


def harness_model(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """lm-eval's HFLM around an in-memory model, with BOS before every loglikelihood context."""
    from lm_eval.models.huggingface import HFLM

    class BosHFLM(HFLM):
        def _encode_pair(self, context: str, continuation: str):
            ctx, cont = super()._encode_pair(context, continuation)
            bos = self.tokenizer.bos_token_id
            if bos is not None and ctx[:1] != [bos]:
                ctx = [bos, *ctx]
            return ctx, cont

    limit = max_length or getattr(model.config, "max_position_embeddings", None)
    return BosHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=limit)


def load_tasks(configs: list[dict]) -> dict:
    """lm-eval task objects of config dicts, set up as `simple_evaluate` sets them (0 few-shot examples
    unless a task says otherwise, a fixed few-shot seed). Calling lm-eval's `evaluate` on them skips
    what `simple_evaluate` adds around it: reseeding the global random generators, and collecting
    environment details (pip, git, torch's collect_env: seconds per call, in every in-loop eval)."""
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_defaults=False).load(configs)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    *,
    task_dir: Path = TASK_DIR,
    limit: int | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 0,
) -> dict[str, float]:
    """Run lm-eval tasks on an in-memory causal LM; returns {"<task>/<metric>": value}.

    The model is put in eval mode and given back in the mode it came in. `bootstrap_iters` > 0
    adds `<metric>_stderr` entries (0 keeps in-loop evaluation cheap). Several processes (a training
    loop's ranks) each run every request and each get the results: HFLM treats a model instance as
    a single process.
    """
    require("lm_eval", "tasks")
    from lm_eval.evaluator import evaluate

    loaded = load_tasks([task_config(t, Path(task_dir)) for t in tasks])
    was_training = model.training
    model.eval()
    try:
        out = evaluate(
            lm=harness_model(model, tokenizer, batch_size),
            task_dict=loaded,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
        )
    finally:
        model.train(was_training)
    return flatten_results(out["results"])


@dataclass
class TaskEvaluator:
    """lm-eval tasks on the training model every `every` steps: a training-loop evaluator
    (pretraining's `train.eval_tasks`), called on every rank.

    HFLM treats a model instance as one process (rank 0 of 1), so every rank runs every request of
    the same task data in the same batches (a fixed batch size, never "auto"): under ZeRO-3 and AutoTP,
    where each forward is a collective, the ranks stay in lockstep. The random generators' states
    are put back afterwards (in case a task draws from them), so training continues exactly as it
    would without the evaluation.
    """

    tasks: list[str]
    tokenizer_dir: Path
    every: int = 0
    """Steps between evaluations (the loop also runs one at the last step); 0 = only at the end."""
    limit: int | None = None
    batch_size: int = 8
    task_dir: Path = TASK_DIR
    _tokenizer: object = field(default=None, init=False, repr=False)

    def __call__(self, engine) -> dict[str, float]:
        """{"<task>/<metric>": value} of the engine's model (collective)."""
        from pipeline.runtime.checkpoint import rng_state, set_rng_state

        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
            logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-call notes about model instances
        saved = rng_state()
        try:
            return evaluate_tasks(
                engine.module,
                self._tokenizer,
                self.tasks,
                task_dir=self.task_dir,
                limit=self.limit,
                batch_size=self.batch_size,
            )
        finally:
            set_rng_state(saved)


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's {task: {"acc,none": x, ...}} -> {"task/acc": x}; non-numeric entries dropped."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "alias":
                flat[f"{task}/{name}" + (f"[{filt}]" if filt and filt != "none" else "")] = float(value)
    return flat


def evaluate_folder(model_dir: Path, tasks: list[str], **kwargs) -> dict[str, float]:
    """evaluate_tasks on a Hugging Face folder (loaded offline, fp32)."""
    from pipeline.finetune.generate import load_model

    model, tokenizer = load_model(model_dir)
    return evaluate_tasks(model, tokenizer, tasks, **kwargs)


def read_texts(path: Path, field: str = "text") -> list[str]:
    """Texts of a JSONL file (`field` of each line) or of a text file (one per non-empty line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [ln.strip() for ln in lines if ln.strip()]
    texts, bad = [], 0
    for line in lines:
        try:
            value = json.loads(line).get(field) if line.strip() else None
        except (json.JSONDecodeError, AttributeError):
            value = None
        if isinstance(value, str) and value.strip():
            texts.append(value.strip())
        elif line.strip():
            bad += 1
    if bad:
        log.warning("%s: skipped %d lines without a string %r", path, bad, field)
    return texts


def cloze_items(texts: list[str], n_choices: int = 4, seed: int = 0, max_chars: int = 80) -> list[dict]:
    """{context, choices, label} items: a text's start, its true continuation and n_choices-1
    continuations of other texts. Texts under 24 characters are skipped."""
    rng = random.Random(seed)
    cuts = [c for c in (split_text(t, max_chars) for t in texts) if c is not None]
    items = []
    for i, (context, truth) in enumerate(cuts):
        others = list({c[1] for j, c in enumerate(cuts) if j != i and c[1] != truth})
        if len(others) < n_choices - 1:
            break
        choices = [*rng.sample(sorted(others), n_choices - 1), truth]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(truth)})
    return items


def split_text(text: str, max_chars: int) -> tuple[str, str] | None:
    """(context, continuation) of a text cut near 60% of its characters, at a space when one is
    within 8 characters (scripts without spaces are cut anywhere); None for short texts."""
    if len(text) < 24:
        return None
    cut = int(len(text) * 0.6)
    spaces = [i for i in range(max(1, cut - 8), min(len(text) - 1, cut + 8)) if text[i] == " "]
    if spaces:
        cut = min(spaces, key=lambda i: abs(i - cut))
    return text[:cut], text[cut : cut + max_chars]


def write_task_data(
    texts: list[str], out_dir: Path, *, n_cloze: int = 200, n_ppl: int = 100, seed: int = 0
) -> dict:
    """Write out_dir/cloze.jsonl and out_dir/ppl.jsonl from texts (de-duplicated, then shuffled with
    `seed`; the two tasks get disjoint texts when there are enough); returns their item counts."""
    from pipeline.io import atomic_write

    texts = list(dict.fromkeys(texts))
    random.Random(seed).shuffle(texts)
    if len(texts) < 8:
        raise DataError(f"need at least 8 texts to make tasks, got {len(texts)}")
    items = cloze_items(texts[:n_cloze], seed=seed)
    docs = [{"text": t} for t in texts[n_cloze : n_cloze + n_ppl] or texts[:n_ppl]]
    for name, rows in (("cloze.jsonl", items), ("ppl.jsonl", docs)):
        with atomic_write(Path(out_dir) / name, "w") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return {"cloze": len(items), "ppl": len(docs)}
