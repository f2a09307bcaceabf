"""lm-evaluation-harness on local tasks (pipeline/deploy/harness.py): task data made here (English
and Chinese), the shipped YAMLs, and the harness's numbers recomputed with plain torch."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from finetune_helpers import ft_init  # noqa: F401

from pipeline.deploy.harness import (
    TASK_DIR,
    cloze_items,
    evaluate_tasks,
    flatten_results,
    split_text,
    task_config,
    write_task_data,
)
from pipeline.errors import ConfigError, DataError

TEXTS = [
    "The json module encodes Python objects as JSON text and decodes them back.",
    "Use pathlib to join paths, list folders and read files without string tricks.",
    "A generator yields values one at a time, so a long stream never sits in memory.",
    "The re module finds patterns in text with regular expressions and groups.",
    "标准库的 json 模块可以把字典和列表编码成文本，也可以把文本解码回对象。",
    "数据预处理是训练语言模型的第一步，清洗后的文本会被切分成词元。",
    "线程池可以并行执行很多小任务，适合等待网络或磁盘的工作。",
    "Sockets send bytes between processes on one machine or across a network.",
    "A dataclass writes the constructor, the representation and comparisons for you.",
    "日志模块按级别记录消息，可以同时写到终端和文件里。",
]


def test_split_text_cuts_at_spaces_or_anywhere_in_chinese():
    ctx, cont = split_text(TEXTS[0], 80)
    assert ctx + cont == TEXTS[0] and cont.startswith(" ")
    ctx, cont = split_text(TEXTS[5], 80)
    assert ctx + cont == TEXTS[5] and len(ctx) == int(len(TEXTS[5]) * 0.6)
    assert split_text("too short", 80) is None


def test_cloze_items_hold_the_truth_once_and_are_deterministic():
    items = cloze_items(TEXTS, seed=3)
    assert len(items) == len(TEXTS) and items == cloze_items(TEXTS, seed=3)
    for item, text in zip(items, TEXTS):
        truth = item["choices"][item["label"]]
        assert item["context"] + truth == text and item["choices"].count(truth) == 1
        assert len(item["choices"]) == 4
    assert {i["label"] for i in items} != {items[0]["label"]}  # the answer is not always in one slot


def test_flatten_results_names_metrics_by_task():
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "bits_per_byte,none": 2.0}}
    assert flatten_results(results) == {"t/acc": 0.5, "t/bits_per_byte": 2.0}


def test_task_yaml_checks(tmp_path):
    with pytest.raises(ConfigError, match="unknown task"):
        task_config("no_such_task", TASK_DIR)
    cfg = task_config("gristmill_cloze", TASK_DIR)  # the shipped task and its shipped data
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(TASK_DIR / "data" / "cloze.jsonl")
    (tmp_path / "hub.yaml").write_text("task: hub\ndataset_path: some/hub-dataset\n")
    with pytest.raises(ConfigError, match="local builder"):
        task_config("hub", tmp_path)
    (tmp_path / "missing.yaml").write_text(
        "task: missing\ndataset_path: json\ndataset_kwargs: {data_files: x.jsonl}\n"
    )
    with pytest.raises(DataError, match="x.jsonl: task data file not found"):
        task_config("missing", tmp_path)
    (tmp_path / "code.yaml").write_text("task: code\ndoc_to_text: !function utils.f\n")
    with pytest.raises(DataError, match="code.yaml"):  # the safe loader never runs task code
        task_config(str(tmp_path / "code.yaml"), tmp_path)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The shipped YAMLs with data made from TEXTS (Chinese included)."""
    folder = tmp_path_factory.mktemp("eval")
    for name in ("gristmill_cloze.yaml", "gristmill_ppl.yaml"):
        shutil.copy2(TASK_DIR / name, folder / name)
    assert write_task_data(TEXTS * 2, folder / "data", n_cloze=10, n_ppl=6) == {"cloze": 10, "ppl": 6}
    return folder


@torch.no_grad()
def sum_logprob(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()  # (T-1, vocab)
    logp = F.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logp[start - 1 :].sum())


def test_harness_numbers_match_a_direct_computation(ft_init, task_dir, capsys):  # noqa: F811
    from launch import evaluate as cli
    from pipeline.finetune.generate import load_model

    cli.main(["--model", str(ft_init), "--tasks", "gristmill_cloze", "gristmill_ppl", "--task-dir", str(task_dir),
              "--bootstrap-iters", "0"])  # fmt: skip
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, tok = load_model(ft_init)
    bos = tok.bos_token_id
    hits = 0
    items = [json.loads(line) for line in (task_dir / "data" / "cloze.jsonl").read_text().splitlines()]
    for item in items:  # BOS + context, then each choice's total log-probability
        start = 1 + len(tok.encode(item["context"], add_special_tokens=False))
        wholes = [[bos, *tok.encode(item["context"] + c, add_special_tokens=False)] for c in item["choices"]]
        scores = [sum_logprob(model, whole, start) for whole in wholes]
        hits += max(range(4), key=scores.__getitem__) == item["label"]
    assert got["gristmill_cloze/acc"] == pytest.approx(hits / len(items))
    docs = [json.loads(line)["text"] for line in (task_dir / "data" / "ppl.jsonl").read_text().splitlines()]
    nll = -sum(sum_logprob(model, [bos, *tok.encode(d, add_special_tokens=False)], 1) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert got["gristmill_ppl/bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)


def test_in_memory_evaluation_keeps_the_training_mode(ft_init, task_dir):  # noqa: F811
    from pipeline.finetune.generate import load_model

    model, tok = load_model(ft_init)
    model.train()
    metrics = evaluate_tasks(model, tok, ["gristmill_cloze"], task_dir=task_dir, limit=4)
    assert model.training and set(metrics) == {
        "gristmill_cloze/acc",
        "gristmill_cloze/acc_norm",
        "gristmill_cloze/sample_len",
    }
    assert metrics["gristmill_cloze/sample_len"] == 4 and 0.0 <= metrics["gristmill_cloze/acc"] <= 1.0
