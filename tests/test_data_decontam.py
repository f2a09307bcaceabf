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
    assert word_units("ที่นี่") == ["ที่", "นี่"]  # Thai vowel and tone marks stay on their letter


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
    assert counts.noted == {f"matched:{n}": expected.count(n) for n in set(expected)}


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


def test_counting_runs_and_alphabet_indexes_are_not_indexed(tmp_path):
    """The held-out "Alphabet" article matched three Wikipedia list pages by their A-Z index alone."""
    article = "The English alphabet: a b c d e f g h i j k l m n o p q r s t u v w x y z and 1 2 3 4 5 6 7 8 9 10 11 12 13 14."
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": article}) + "\n")
    cfg = DecontamConfig(enabled=True, eval_sets=[EvalSetConfig("e", tmp_path / "e.jsonl")])
    index = build_index(cfg)
    assert index.stats["e"]["ngrams"] == 3 + 13  # the windows that hold a word (the, english, alphabet; and)
    nav = Document(
        "w",
        "Index: A B C D E F G H I J K L M N O P Q R S T U V W X Y Z, pages 1 2 3 4 5 6 7 8 9 10 11 12 13 14",
        "web",
    )
    copy = Document("c", f"Quoted: {article}", "web")
    kept, counts = Decontaminate(cfg, index).process([nav, copy])
    assert [d.id for d in kept] == ["w"] and counts.dropped == {"contaminated": 1}


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


EN = [
    "the",
    "river",
    "town",
    "bridge",
    "old",
    "history",
    "people",
    "market",
    "church",
    "long",
    "summer",
    "winter",
    "night",
    "water",
    "stone",
    "road",
]
DE = [
    "der",
    "die",
    "und",
    "das",
    "Fluss",
    "Stadt",
    "Brücke",
    "alte",
    "Geschichte",
    "Menschen",
    "Markt",
    "Kirche",
    "lange",
    "Sommer",
    "Winter",
    "Nacht",
]


def _job_inputs(tmp_path, item: str) -> list[str]:
    """Two JSONL inputs of distinct English and German documents (seeded word salad, so dedup keeps
    them all); `item` planted in 1 document of a, 2 of b."""
    rng = random.Random(0)
    for name, n, planted in (("a", 30, {3}), ("b", 20, {0, 7})):
        rows = []
        for i in range(n):
            words = rng.choices(EN if i % 3 else DE, k=30)
            rows.append({"text": " ".join(words) + "." + (f" {item}." if i in planted else "")})
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


def test_a_clean_task_uses_the_index_it_is_given_and_notes_matches(tmp_path):
    """clean_file takes the job's shared objects: it never builds its own index when given one."""
    from pipeline.data.config import CleanConfig, DataConfig, FiltersConfig
    from pipeline.data.shards import clean_file

    given, configured = "the quick brown fox jumps over the lazy dog near the river bank today", "zzz " * 20
    for name, text in (("given", given), ("configured", configured)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    rows = [
        {"text": f"Story {i}: " + (given if i == 1 else "nothing to see here at all, move on")}
        for i in range(3)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    decontam = DecontamConfig(enabled=True, eval_sets=[EvalSetConfig("e", tmp_path / "configured.jsonl")])
    cfg = DataConfig(
        inputs=["x"],
        output_dir=tmp_path,
        clean=CleanConfig(min_chars=1),
        filters=FiltersConfig(decontam=decontam),
    )
    index = build_index(
        DecontamConfig(enabled=True, eval_sets=[EvalSetConfig("e", tmp_path / "given.jsonl")])
    )
    stats = clean_file(tmp_path / "in.jsonl", tmp_path / "cleaned", cfg, "h", {"decontam": index})
    row = next(e for e in stats["stages"] if e["name"] == "decontam")
    assert row["dropped"] == {"contaminated": 1} and row["noted"] == {"matched:e": 1}


@pytest.mark.ray
def test_job_shares_the_index_reports_matches_and_cuts_quality_job_wide(ray_local, tmp_path):
    """The Ray job: decontam matches per evaluation set and input file in the report, and the quality
    model's top_fraction cut in the select step, the same bytes with 1 or 2 workers (lid.176 as the
    model: the score is P(en))."""
    from pipeline.data.config import CleanConfig, DataConfig, FiltersConfig, RayConfig
    from pipeline.data.langid import bundled_model_path
    from pipeline.data.quality_model import QualityModelConfig
    from pipeline.data.runner import prepare_data
    from pipeline.io import read_jsonl_zst

    item = "The mitochondria is the powerhouse of the cell and makes most of the energy a cell needs"
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": item}) + "\n")
    filters = FiltersConfig(
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
    outs = {}
    for workers in (2, 1):
        out = tmp_path / f"out{workers}"
        cfg = DataConfig(
            inputs=_job_inputs(tmp_path, item), output_dir=out, steps=["clean", "dedup", "select"],
            ray=RayConfig(num_cpus=workers), clean=CleanConfig(min_chars=20), filters=filters,
        )  # fmt: skip
        cfg.validate()
        report = prepare_data(cfg)
        outs[workers] = [(out / "selected" / f"{n}.jsonl.zst").read_bytes() for n in "ab"]
    assert outs[1] == outs[2]
    bio = report["clean"]["decontam"]["bio"]
    assert bio["matched"] == {"a.jsonl": 1, "b.jsonl": 2} and bio["records"] == 1
    assert report["clean"]["totals"]["dropped"] == {"contaminated": 3}
    cut, sel = report["select"]["cut"], report["select"]["totals"]
    assert sel["in"] == report["dedup"]["totals"]["kept"] == cut["scored"] == 47  # no duplicates here
    assert sel["kept"] == cut["kept"] >= cut["target"] == 24  # ceil(0.5 x 47)
    kept = [r for n in "ab" for r in read_jsonl_zst(tmp_path / "out1" / "selected" / f"{n}.jsonl.zst")]
    assert len(kept) == sel["kept"] and all(r["meta"]["scores"]["quality"] >= cut["threshold"] for r in kept)
    assert all(r["text"].split()[0] in EN for r in kept)  # the English ones: P(en) is the score
    md = (tmp_path / "out1" / "report.md").read_text()
    assert "| bio | b.jsonl | 2 |" in md and "## Learned quality score" in md
