"""Decontamination (pipeline/data/decontam.py): planted evaluation text is found wherever it sits,
in English and Chinese, and clean real web text gives no hit; bad evaluation files fail clearly."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import assert_accounting

from pipeline.data.decontam import DecontamConfig, Decontaminate, EvalSetConfig, build_index
from pipeline.data.document import Document
from pipeline.data.records import field_texts, iter_records
from pipeline.data.units import word_units
from pipeline.errors import ConfigError, DataError


def test_units_split_unspaced_scripts_per_character_and_keep_marks_inside_words():
    assert word_units("Ｆｕｌｌ-width, CAFÉ!") == ["full", "width", "café"]
    assert word_units("数学是研究。") == ["数", "学", "是", "研", "究"]
    assert word_units("こんにちは世界") == list("こんにちは世界")
    assert word_units("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs stay in the word
    assert word_units("한국어 문장") == ["한국어", "문장"]  # Korean is written with spaces


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory, raw_samples):
    """Real third-party text as evaluation sets: self-instruct tasks (JSONL, nested fields) and
    Alpaca-zh answers (Parquet), neither of which the web samples contain."""
    folder = tmp_path_factory.mktemp("evals")
    tasks = list(iter_records(raw_samples / "sft" / "self-instruct-seed_tasks.jsonl"))
    zh = [r for r in iter_records(raw_samples / "sft" / "alpaca_zh_demo.json")][:300]
    pq.write_table(pa.Table.from_pylist([{"answer": r["output"]} for r in zh]), folder / "zh.parquet")
    cfg = DecontamConfig(
        enabled=True,
        eval_sets=[
            EvalSetConfig(
                "tasks",
                raw_samples / "sft" / "self-instruct-seed_tasks.jsonl",
                ["instruction", "instances.output"],
            ),
            EvalSetConfig("zh_answers", folder / "zh.parquet", ["answer"]),
        ],
    )
    return cfg, tasks, zh


def _web_docs(raw_samples) -> list[Document]:
    docs = []
    for name, field in [
        ("CC-MAIN-20190717121559-20190717143559-00140.dolma.jsonl.gz", "text"),
        ("c4-en-sample.jsonl", "text"),
        ("oscar-2201-multilingual-sample.jsonl.zst", "content"),
    ]:
        for i, rec in enumerate(iter_records(raw_samples / "web" / name)):
            docs += [Document(f"{name}/{i}", t, source=name.split(".")[0]) for t in field_texts(rec, [field])]
    return docs


def _plant(doc: Document, passage: str, where: str) -> Document:
    """`passage` inserted at the start, in the middle (at a line break) or at the end of `doc`."""
    text = doc.text
    cut = text.find("\n", len(text) // 2)
    cut = len(text) // 2 if cut < 0 else cut
    out = {
        "start": f"{passage}\n{text}",
        "middle": f"{text[:cut]}\n{passage}\n{text[cut:]}",
        "end": f"{text} {passage}",
    }
    return Document(doc.id + "+planted", out[where], doc.source)


def test_planted_contamination_is_found_at_every_position_and_clean_text_gives_no_hit(raw_samples, eval_sets):
    cfg, tasks, zh = eval_sets
    index = build_index(cfg)
    assert index.stats["tasks"]["records"] == 175 and index.stats["zh_answers"]["ngrams"] > 1000
    clean = _web_docs(raw_samples)
    rng = random.Random(0)
    planted, expected = [], []
    for i, doc in enumerate(rng.sample(clean, 60)):
        where = ("start", "middle", "end")[i % 3]
        if i % 2:  # an English task, changed in case and line breaks as a scraper would
            passage, name = tasks[i]["instruction"].upper().replace(" ", "\n", 3), "tasks"
        else:  # a Chinese answer, glued into the text without spaces
            passage, name = zh[i]["output"], "zh_answers"
        if len(word_units(passage)) < cfg.min_ngram:
            continue
        planted.append(_plant(doc, passage, where))
        expected.append(name)
    stage = Decontaminate(cfg, index)
    kept, counts = stage.process(clean + planted)
    assert_accounting(clean + planted, kept, counts)
    assert counts.dropped == {"contaminated": len(planted)}  # recall 1.0 and no false hit on clean text
    assert {d.id for d in kept} == {d.id for d in clean}
    hits = stage.stage_stats()["hits"]
    assert {name: sum(v.values()) for name, v in hits.items()} == {
        n: expected.count(n) for n in set(expected)
    }


def test_short_items_match_by_their_min_ngrams_and_flag_mode_keeps_the_document(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"q": "Which river flows through the old city of Prague"}, {"q": "Capital of France?"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DecontamConfig(enabled=True, eval_sets=[EvalSetConfig("qa", path, ["q"])], action="flag")
    index = build_index(cfg)
    assert (
        index.stats["qa"]["too_short"] == 1
    )  # 3 words: cannot be matched without false hits; 9 words: two 8-grams
    docs = [
        Document("a", "Quiz night! Which river flows through the old city of Prague? The Vltava.", "web"),
        Document("b", "Which river flows through the new city of Prague, people asked.", "web"),
    ]
    kept, counts = Decontaminate(cfg, index).process(docs)
    assert (
        counts.kept == 2
        and kept[0].meta["contamination"] == {"qa": 2}
        and "contamination" not in kept[1].meta
    )


def test_a_damaged_set_or_a_wrong_field_name_fails_naming_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line of words here for the index to use today"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        build_index(DecontamConfig(enabled=True, eval_sets=[EvalSetConfig("b", bad)]))
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "x"}\n')
    with pytest.raises(ConfigError, match="has any of"):
        build_index(DecontamConfig(enabled=True, eval_sets=[EvalSetConfig("g", good, ["questoin"])]))
    with pytest.raises(ConfigError, match="eval_sets"):
        DecontamConfig(enabled=True).validate()


@pytest.mark.ray
def test_job_shares_the_index_reports_hits_per_set_and_source_and_cuts_quality_job_wide(ray_local, tmp_path):
    """The Ray job: decontam hits per evaluation set and input source in the report, and the
    quality model's top_fraction applied as one cut over every shard (lid.176 as the model: P(en))."""
    from pipeline.data.config import CleanConfig, DataConfig, RayConfig
    from pipeline.data.langid import bundled_model_path
    from pipeline.data.quality_model import QualityModelConfig
    from pipeline.data.runner import prepare_data
    from pipeline.io import read_jsonl_zst

    item = "The mitochondria is the powerhouse of the cell and makes most of the energy a cell needs"
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": item}) + "\n")
    en = "Document {} talks about rivers, bridges and the long history of the old town near the sea."
    de = "Das Dokument {} erzählt von Flüssen, Brücken und der langen Geschichte der alten Stadt am Meer."
    for name, n, planted in (("a", 30, {3}), ("b", 20, {0, 7})):
        rows = [
            {"text": (en if i % 3 else de).format(i) + (f" {item}." if i in planted else "")}
            for i in range(n)
        ]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        inputs=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
        output_dir=tmp_path / "out",
        steps=["clean"],
        ray=RayConfig(num_cpus=2),
        clean=CleanConfig(min_chars=20),
        quality_model=QualityModelConfig(
            enabled=True,
            model=bundled_model_path(),
            positive_label="en",
            keep="top_fraction",
            top_fraction=0.5,
        ),
        decontam=DecontamConfig(
            enabled=True, eval_sets=[EvalSetConfig("bio", tmp_path / "eval.jsonl", ["question"])]
        ),
    )
    report = prepare_data(cfg)
    assert report["clean"]["stage_stats"]["decontam"]["hits"] == {"bio": {"a": 1, "b": 2}}
    assert report["clean"]["totals"]["dropped"] == {"contaminated": 3}
    kept = [
        r for name in ("a", "b") for r in read_jsonl_zst(tmp_path / "out" / "selected" / f"{name}.jsonl.zst")
    ]
    cut = report["select"]["cut"]
    assert (
        len(kept) == cut["kept"] == report["select"]["totals"]["kept"] >= cut["target"] == 24
    )  # ceil(0.5 x 47)
    assert all(r["meta"]["scores"]["quality"] >= cut["threshold"] for r in kept)
    assert all(r["text"].startswith("Document") for r in kept)  # the English half: P(en) is the score
    assert "| bio | b | 2 |" in (tmp_path / "out" / "report.md").read_text()
