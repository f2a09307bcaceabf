"""The Ray data-prep job (pipeline/data/runner.py, launch/prepare_data.py): determinism, resume, errors."""

from __future__ import annotations

import bz2
import json
import os
import random
import shutil
import signal
import threading
import time
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
    with pytest.raises(DataError, match=r"clean: 1 of 3 tasks failed: .*notes\.xml: 1 of 1 records"):
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


@pytest.fixture
def mixed_inputs(tmp_path) -> list[str]:
    """A wiki dump, two JSONL files sharing documents (exact and near copies) and a WARC file."""
    from data_helpers import html_response, jsonl_bytes, make_multistream, warc_gz, warc_record

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "wiki.xml").write_text(make_dump([*ARTICLES, ("Short", 0, 9, "tiny")], dbname="alphawiki"))
    story = " ".join(
        f"The mill number {i} ground flour for the town and the river turned its wheel." for i in range(30)
    )
    rows_a = [{"text": story}, {"text": f"A different story about boats. {story[:300]} Boats float."}]
    rows_b = [
        {"text": story.upper()},
        {"text": story.replace("number 7 ", "number seven ")},
        {"text": "x" * 250},
    ]
    (folder / "a.jsonl").write_bytes(jsonl_bytes(rows_a))
    (folder / "b.jsonl.gz").write_bytes(__import__("gzip").compress(jsonl_bytes(rows_b)))
    records = [warc_record("response", f"https://x.test/{i}", html_response(i)) for i in range(3)]
    (folder / "crawl.warc.gz").write_bytes(warc_gz(records))
    pages = [(f"M {i}", 0, 500 + i, f"Multistream page {i} says {i * 7} things. " * 6) for i in range(30)]
    make_multistream(folder, pages, per_stream=10)  # 3 streams: 3 tasks with streams_per_task=1
    return [
        str(folder / "*.xml"),
        str(folder / "*.jsonl*"),
        str(folder / "*.warc.gz"),
        str(folder / "*.xml.bz2"),
    ]


def mixed_cfg(inputs: list[str], out: Path, workers: int) -> DataConfig:
    cfg = clean_cfg(inputs, out, workers)
    cfg.steps = ["clean", "dedup"]
    cfg.filters.fineweb.enabled = True
    cfg.filters.pii.enabled = True
    cfg.filters.skip_sources = ["wikipedia"]
    cfg.read.streams_per_task = 1
    return cfg


def all_bytes(out: Path) -> dict[str, bytes]:
    return {
        f"{p.parent.name}/{p.name}": p.read_bytes()
        for d in ("cleaned", "deduped")
        for p in sorted((out / d).iterdir())
    }


@pytest.mark.ray
def test_mixed_formats_with_dedup_same_bytes_with_1_or_2_workers(ray_local, mixed_inputs, tmp_path):
    from pipeline.data.runner import prepare_data

    one = prepare_data(mixed_cfg(mixed_inputs, tmp_path / "w1", 1))
    prepare_data(mixed_cfg(mixed_inputs, tmp_path / "w2", 2))
    first = all_bytes(tmp_path / "w1")
    assert first == all_bytes(tmp_path / "w2") and "deduped/b.jsonl.zst" in first
    clean, dedup = one["clean"], one["dedup"]
    assert {s["format"] for s in clean["shards"].values()} == {"wikipedia", "jsonl", "warc"}
    ranges = sorted(name for name in clean["shards"] if "@" in name)  # one shard per stream range
    assert len(ranges) == 3 and all(clean["shards"][r]["totals"]["kept"] == 10 for r in ranges)
    assert_accounting(clean["totals"]["in"], range(clean["totals"]["kept"]), clean["totals"])
    assert dedup["totals"]["in"] == clean["totals"]["kept"]
    assert dedup["totals"]["dropped"] == {"dup_exact": 1, "dup_near": 1}  # b/1 (upper case), b/2 (one word)
    assert dedup["clusters"]["clusters"] == 1 and dedup["clusters"]["largest"] == 3
    funnel = [r["name"] for r in __import__("pipeline.data.report", fromlist=["funnel"]).funnel(one)]
    assert funnel[:3] == ["read", "html", "wikitext"] and funnel[-1] == "dedup"
    md = (tmp_path / "w1" / "report.md").read_text()
    assert "| dedup |" in md and "1 duplicate clusters holding 3 documents" in md
    assert (tmp_path / "w1" / "report.png").read_bytes()[:4] == b"\x89PNG"

    # resume: a lost deduped shard is rewritten from the same decisions
    (tmp_path / "w2" / "deduped" / "b.jsonl.zst").unlink()
    again = prepare_data(mixed_cfg(mixed_inputs, tmp_path / "w2", 2))
    assert all_bytes(tmp_path / "w2") == first and again["clean"]["shards_skipped"] == 7


@pytest.mark.ray
@pytest.mark.slow
def test_every_real_sample_in_one_job(ray_local, raw_samples, tmp_path, monkeypatch):
    """configs/data/all_samples.yaml: every reader, filter and dedup over ../shared/data/raw."""
    from pipeline.data.runner import prepare_data

    monkeypatch.chdir(REPO)  # the config's paths are relative to the repo
    cfg = load_config(DataConfig, REPO / "configs" / "data" / "all_samples.yaml", [f"output_dir={tmp_path}"])
    report = prepare_data(cfg)
    clean = report["clean"]
    assert len(clean["shards"]) == 18 and clean["totals"]["errors"] == {}
    formats = {s["format"] for s in clean["shards"].values()}
    assert formats == {"wikipedia", "jsonl", "warc", "wet"}
    assert_accounting(clean["totals"]["in"], range(clean["totals"]["kept"]), clean["totals"])
    names = [s["name"] for s in clean["stages"]]
    for stage in (
        "html",
        "wikitext",
        "langid",
        "gopher_repetition",
        "gopher_quality",
        "c4",
        "fineweb",
        "pii",
    ):
        assert stage in names
    assert report["dedup"]["totals"]["in"] == clean["totals"]["kept"] > 300
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.png").is_file()


CLUSTER_JOB = """
import json, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
sys.path.insert(0, {tests!r})
from test_data_runner import mixed_cfg
from pipeline.data.runner import prepare_data

cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "include_dashboard": False}})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
cfg = mixed_cfg({inputs!r}, Path({out!r}), 2)
cfg.ray.address, cfg.ray.num_cpus = cluster.address, None  # join it, as ray.address=... does
report = prepare_data(cfg)
ray.init(address=cluster.address)
alive = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps({{"nodes": len(alive), "cpus": ray.cluster_resources()["CPU"], "kept": report["dedup"]["totals"]["kept"]}}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.ray
@pytest.mark.slow
def test_two_node_cluster_gives_the_same_bytes(ray_local, mixed_inputs, tmp_path):
    """A real 2-node Ray cluster (ray.cluster_utils.Cluster, in a child process because this one
    already holds the session's local Ray), joined through ray.address."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from pipeline.data.runner import prepare_data

    prepare_data(mixed_cfg(mixed_inputs, tmp_path / "local", 2))
    script = CLUSTER_JOB.format(tests=str(REPO / "tests"), inputs=mixed_inputs, out=str(tmp_path / "cluster"))
    # A private Ray temp dir (short: Ray's socket paths must stay under ~107 bytes), so the cluster's
    # address file never leads another Ray on this machine to join it.
    ray_tmp = tempfile.mkdtemp(prefix="gmray")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 2 and result["cpus"] == 2.0
    assert all_bytes(tmp_path / "cluster") == all_bytes(tmp_path / "local")


@pytest.mark.ray
def test_clean_dedup_tokenize_reads_the_deduped_shards(ray_local, mixed_inputs, tmp_path):
    from dist_helpers import make_tokenizer_dir

    from pipeline.data.manifest import verify_manifest
    from pipeline.data.runner import prepare_data

    tok = make_tokenizer_dir(tmp_path / "tok", [ARTICLES[0][3]] * 50 + ["The mill ground flour."] * 50)
    cfg = mixed_cfg(mixed_inputs, tmp_path / "out", 2)
    cfg.steps, cfg.tokenize.tokenizer = ["clean", "dedup", "tokenize"], tok
    report = prepare_data(cfg)
    manifest = verify_manifest(tmp_path / "out" / "tokens")
    assert sum(t["documents"] for t in manifest["totals"].values()) == report["dedup"]["totals"]["kept"]


def test_a_single_stream_bz2_dump_is_one_task_and_the_log_says_how_to_split_it(inputs, caplog):
    from pipeline.data.runner import resolve_inputs, work_units

    cfg = clean_cfg(inputs, Path("unused"), 1)
    with caplog.at_level("INFO", logger="pipeline.data.runner"):
        units = work_units(resolve_inputs(inputs), cfg)
    assert [u.byte_range for u in units] == [None, None, None]
    notes = [r.getMessage() for r in caplog.records if "single bz2 stream" in r.getMessage()]
    assert len(notes) == 2 and all("pages-articles-multistream.xml.bz2" in n for n in notes)  # the two .bz2


def test_ray_settings_reach_ray_init_and_are_checked():
    from pipeline.data.runner import ray_init_kwargs

    local = ray_init_kwargs(RayConfig(num_cpus=3, object_store_memory=2 << 30, spill_dir=Path("spill")))
    assert local["num_cpus"] == 3 and local["object_store_memory"] == 2 << 30
    spill = json.loads(local["_system_config"]["object_spilling_config"])
    assert spill == {"type": "filesystem", "params": {"directory_path": str(Path("spill").resolve())}}
    assert ray_init_kwargs(RayConfig(address="auto"))["address"] == "auto"
    with pytest.raises(ConfigError, match=r"spill_dir: applies to a local Ray instance only.*ray start"):
        RayConfig(address="auto", spill_dir=Path("s")).validate()
    with pytest.raises(ConfigError, match="object_store_memory: must be at least 78 MiB"):
        RayConfig(object_store_memory=1000).validate()


@pytest.mark.ray
def test_shared_objects_reach_every_task_without_a_copy(ray_local, tmp_path):
    import operator

    import numpy as np

    from pipeline.data.runner import Job

    job = Job(DataConfig(inputs=["x"], output_dir=tmp_path), [], [], tmp_path)
    job.share("index", np.arange(1000, dtype=np.int64))
    ref = job.shared("index")
    assert job.map(np.sum, [(ref,)] * 3, "sum") == [499500] * 3
    assert job.map(operator.attrgetter("flags.writeable"), [(ref,)], "view") == [False]  # the store's memory


def _kill_first(name: str, stop: threading.Event, killed: list) -> None:
    """SIGKILL the first Ray worker of this process seen running task `name`."""
    import psutil

    me = psutil.Process()
    while not stop.is_set() and not killed:
        for proc in me.children(recursive=True):
            try:
                if proc.cmdline()[:1] == [f"ray::{name}"]:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    break
            except (psutil.Error, OSError):
                continue
        time.sleep(0.005)


@pytest.mark.ray
def test_a_worker_killed_mid_job_is_retried_and_the_output_bytes_are_the_same(ray_local, tmp_path):
    from data_helpers import jsonl_bytes

    from pipeline.data.runner import prepare_data

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(2000)]
    folder = tmp_path / "in"
    folder.mkdir()
    docs = [" ".join(rng.choice(vocab) for _ in range(300)) for _ in range(150)]
    for s in range(4):  # some documents in several shards: dedup has work too
        rows = [{"text": docs[(s * 20 + i) % len(docs)]} for i in range(60)]
        (folder / f"part{s}.jsonl").write_bytes(jsonl_bytes(rows))

    def cfg(out):
        c = clean_cfg([str(folder / "*.jsonl")], out, 2)
        c.steps = ["clean", "dedup"]
        return c

    reference = prepare_data(cfg(tmp_path / "ref"))
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first, args=("clean_file", stop, killed))
    killer.start()
    try:
        again = prepare_data(cfg(tmp_path / "killed"))
    finally:
        stop.set()
        killer.join()
    assert killed, "no clean task was seen running; the shards are too small to catch one"
    assert all_bytes(tmp_path / "killed") == all_bytes(tmp_path / "ref")  # no temp file left either
    assert again["dedup"]["totals"] == reference["dedup"]["totals"]
    assert reference["dedup"]["totals"]["dropped"]["dup_exact"] > 0
