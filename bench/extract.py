"""WARC to text, docs/s per core: our reader + Resiliparse (and + trafilatura) vs datatrove's
WarcReader + Trafilatura (FineWeb's extraction step), on the same files in the same run.

    python bench/extract.py [--copies 8] [--python-datatrove PATH]

The input is the real WARC samples in ../shared/data/raw/web (32 HTML responses), copied
`--copies` times into a temporary folder so that each run lasts long enough to time. Every
variant runs in one process, so docs/s is per core. datatrove comes from the `bench` extra
(or `--python-datatrove` / DATATROVE_PYTHON for a separate venv).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the repo root instead of bench/: pipeline imports, and no bench module can shadow the standard library
sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.data.stage import run_stages  # noqa: E402
from pipeline.data.warc import HtmlExtractor, WarcReader  # noqa: E402

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw" / "web"
SAMPLES = [
    "CC-MAIN-20200808165417-20200808195417-00395.excerpt.warc.gz",
    "CC-MAIN-2024-22-whirlwind.warc.gz",
    "wget-sample-0001.warc.gz",
]


def make_corpus(folder: Path, copies: int) -> list[Path]:
    out = []
    for c in range(copies):
        for name in SAMPLES:
            dst = folder / f"c{c:03d}-{name}"
            shutil.copy(RAW / name, dst)
            out.append(dst)
    return out


def run_ours(files: list[Path], method: str) -> tuple[int, float]:
    start = time.perf_counter()
    stage, kept = HtmlExtractor(method), 0
    for f in files:
        docs, _ = run_stages([stage], list(WarcReader(f)))
        kept += len(docs)
    return kept, time.perf_counter() - start


def run_datatrove(python: str, folder: Path) -> tuple[int, float]:
    helper = Path(__file__).with_name("_datatrove_extract.py")
    proc = subprocess.run(
        [python, "-I", str(helper), str(folder)], check=True, capture_output=True, text=True
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return res["docs"], res["seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=8)
    default_python = sys.executable if importlib.util.find_spec("datatrove") else None
    parser.add_argument("--python-datatrove", default=os.environ.get("DATATROVE_PYTHON") or default_python)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_corpus(Path(tmp), args.copies)
        pages = sum(1 for f in files for _ in WarcReader(f))  # warm the OS cache, count the inputs
        print(f"input: {len(files)} WARC files, {pages} HTML responses")
        rates = {}
        for label, method in (("ours, resiliparse", "resiliparse"), ("ours, trafilatura", "trafilatura")):
            docs, secs = run_ours(files, method)
            rates[label] = pages / secs
            print(f"{label:28s} {rates[label]:8.0f} docs/s/core ({docs} docs with text)")
        if not args.python_datatrove:
            print("datatrove: skipped (pip install -e .[bench], or pass --python-datatrove)")
            return
        docs, secs = run_datatrove(args.python_datatrove, Path(tmp))
        rates["datatrove"] = pages / secs
        print(f"{'datatrove, trafilatura':28s} {rates['datatrove']:8.0f} docs/s/core ({docs} docs with text)")
    base = rates["datatrove"]
    print(f"ratio ours (resiliparse) / datatrove: {rates['ours, resiliparse'] / base:.1f}x")
    print(f"ratio ours (trafilatura) / datatrove: {rates['ours, trafilatura'] / base:.1f}x")


if __name__ == "__main__":
    main()
