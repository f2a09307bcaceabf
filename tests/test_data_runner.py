"""The Ray data-prep job (pipeline/data/runner.py, launch/prepare_data.py): determinism, resume, errors."""

from __future__ import annotations

import bz2
import shutil
from pathlib import Path

import pytest
from helpers import ARTICLES, assert_accounting, make_dump

from pipeline.config import load_config
from pipeline.data.config import CleanConfig, DataConfig, RayConfig
from pipeline.errors import ConfigError, DataError
from pipeline.io import TMP_PREFIX

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "sample" / "pywiki-sample.xml.bz2"


@pytest.fixture
def inputs(tmp_path) -> list[str]:
    """Three small dumps: the shipped sample, a plain .xml and a .xml.bz2 without siteinfo."""
    folder = tmp_path / "raw"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / SAMPLE.name)
    (folder / "alpha.xml").write_text(make_dump([*ARTICLES, ("Short", 0, 9, "tiny")], dbname="alphawiki"))
    pages = [(f"B {i}", 0, 100 + i, f"Beta page {i} text. " * (5 + i)) for i in range(40)]
    (folder / "beta.xml.bz2").write_bytes(bz2.compress(make_dump(pages, dbname=None).encode()))
    return [str(folder / SAMPLE.name), str(folder / "alpha.xml"), str(folder / "beta*.bz2")]


def clean_cfg(inputs: list[str], out: Path, workers: int) -> DataConfig:
    return DataConfig(
        inputs=inputs,
        output_dir=out,
        steps=["clean"],
        ray=RayConfig(num_cpus=workers),
        clean=CleanConfig(min_chars=100),
    )


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "cleaned").iterdir())}


@pytest.mark.ray
def test_same_bytes_with_1_or_2_workers_and_after_a_resume(ray_local, inputs, tmp_path):
    from pipeline.data.runner import prepare_data

    one = prepare_data(clean_cfg(inputs, tmp_path / "w1", 1))
    two = prepare_data(clean_cfg(inputs, tmp_path / "w2", 2))
    first = shard_bytes(tmp_path / "w1")
    assert len(first) == 6 and first == shard_bytes(tmp_path / "w2")  # data and stats, byte for byte
    assert one["clean"]["totals"] == two["clean"]["totals"]
    totals = one["clean"]["totals"]
    assert totals["in"] == 286 + 6 + 40 and totals["dropped"]["too_short"] >= 1
    assert_accounting(totals["in"], range(totals["kept"]), totals)
    funnel = one["clean"]["stages"]
    assert [c["name"] for c in funnel] == ["read", "wikitext", "normalize", "min_length"]
    assert funnel[0]["in"] == totals["in"] and funnel[-1]["kept"] == totals["kept"]
    for prev, nxt in zip(funnel, funnel[1:]):
        assert nxt["in"] == prev["kept"]
    assert (tmp_path / "w1" / "report.json").is_file() and (tmp_path / "w1" / "config.yaml").is_file()

    # fake a kill: one finished shard gone, a half-written temp file left behind
    (tmp_path / "w2" / "cleaned" / "alpha.jsonl.zst").unlink()
    (tmp_path / "w2" / "cleaned" / f"{TMP_PREFIX}beta.jsonl.zst.x1y2").write_bytes(b"partial")
    again = prepare_data(clean_cfg(inputs, tmp_path / "w2", 2))
    assert shard_bytes(tmp_path / "w2") == first
    assert again["clean"]["shards_skipped"] == 2 and again["clean"]["totals"] == totals


@pytest.mark.ray
def test_a_foreign_file_fails_its_shard_with_a_data_error_naming_it(ray_local, inputs, tmp_path):
    from pipeline.data.runner import prepare_data

    notes = tmp_path / "raw" / "notes.xml"
    notes.write_text("not a dump\n")
    with pytest.raises(DataError, match=r"1 of 3 shards failed: .*notes\.xml: 1 of 1 records"):
        prepare_data(clean_cfg([inputs[1], str(notes), inputs[2]], tmp_path / "out", 2))
    assert sorted(p.name for p in (tmp_path / "out" / "cleaned").glob("*.jsonl.zst")) == [
        "alpha.jsonl.zst",
        "beta.jsonl.zst",
    ]


def test_inputs_are_checked_before_anything_starts(tmp_path):
    from pipeline.data.runner import resolve_inputs

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"inputs\[1\]: input file not found: .*missing\.xml"):
        resolve_inputs([str(SAMPLE), str(tmp_path / "missing.xml")])
    with pytest.raises(DataError, match=r"inputs\[0\]: no file matches .*\*\.xml\.bz2"):
        resolve_inputs([str(tmp_path / "*.xml.bz2")])
    for d in ("a", "b"):
        shutil.copy(SAMPLE, tmp_path / d / SAMPLE.name)
    with pytest.raises(DataError, match="would both write cleaned/pywiki-sample.jsonl.zst"):
        resolve_inputs([str(tmp_path / "*" / "*.bz2")])


def test_missing_tokenizer_is_a_config_error_with_the_fix(tmp_path):
    from pipeline.data.runner import prepare_data

    cfg = DataConfig(inputs=[str(SAMPLE)], output_dir=tmp_path / "out")
    cfg.tokenize.tokenizer = tmp_path / "tokenizers" / "none"
    with pytest.raises(ConfigError, match=r"tokenize\.tokenizer: .*launch/train_tokenizer\.py --config"):
        prepare_data(cfg)


def test_launcher_prints_one_line_on_user_error(tmp_path, capsys):
    from launch.prepare_data import main

    with pytest.raises(SystemExit) as exc:
        main(
            [
                "--config",
                str(REPO / "configs" / "data" / "wiki_sample.yaml"),
                "inputs=[nope.xml]",
                f"output_dir={tmp_path}",
                "steps=[clean]",
            ]
        )
    assert exc.value.code == "error: inputs[0]: input file not found: nope.xml"


def test_sample_config_loads():
    cfg = load_config(DataConfig, REPO / "configs" / "data" / "wiki_sample.yaml")
    assert cfg.inputs == ["tests/data/sample/pywiki-sample.xml.bz2"] and cfg.ray.num_cpus == 2
    assert cfg.tokenize.tokenizer == Path("tokenizers/wiki_sample") and cfg.steps == ["clean", "tokenize"]


@pytest.mark.ray
def test_clean_then_tokenize_writes_a_manifest(ray_local, inputs, tmp_path):
    pytest.importorskip("pipeline.data.tokenize", reason="pipeline/data/tokenize.py not written yet")
    from dist_helpers import make_tokenizer_dir

    from pipeline.data.manifest import verify_manifest
    from pipeline.data.runner import prepare_data

    tok = make_tokenizer_dir(tmp_path / "tok", [ARTICLES[0][3]] * 50 + ["Beta page text."] * 50)
    cfg = clean_cfg(inputs, tmp_path / "out", 2)
    cfg.steps, cfg.tokenize.tokenizer = ["clean", "tokenize"], tok
    report = prepare_data(cfg)
    manifest = verify_manifest(tmp_path / "out" / "tokens")
    assert report["tokenize"]["entries"] >= 3
    assert sum(t["documents"] for t in manifest["totals"].values()) == report["clean"]["totals"]["kept"]
