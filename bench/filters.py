"""Quality-filter throughput and agreement: our Gopher+C4+FineWeb chain vs datatrove's.

    python bench/filters.py [--python-datatrove PATH] [--repeat 3]

Both chains run on the same documents (every web JSONL sample in ../shared/data/raw/web, after
our whitespace normalization), one process each, timed in CPU seconds of that process (so the
rate is per core, and other jobs on the machine do not skew the ratio). Settings are the
FineWeb recipe's with C4's paper numbers on both sides: Gopher repetition and quality defaults,
C4 with 5 words per line, 3 sentences and no terminal-punctuation line rule, FineWeb defaults.

datatrove comes with the `bench` extra (`pip install -e .[bench]`: datatrove without its
`processing` extra, whose fasttext and trafilatura pins clash with ours, plus regex and spaCy);
its chain runs in a child process of this interpreter, or of `--python-datatrove PATH` (or
DATATROVE_PYTHON) for a separate venv. Prints both rates, the ratio, the share of documents whose
keep/drop decision agrees (on the English documents FineWeb's chain sees, and on all) and each
kind of disagreement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# the repo root instead of bench/: pipeline imports, and no bench module can shadow the standard library
sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.data.config import (  # noqa: E402
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    ReadConfig,  # noqa: E402
)
from pipeline.data.document import Document  # noqa: E402
from pipeline.data.filters import normalize_text  # noqa: E402
from pipeline.data.formats import open_reader  # noqa: E402
from pipeline.data.quality import C4Quality, FineWebQuality, GopherQuality, GopherRepetition  # noqa: E402

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw" / "web"


def load_docs() -> list[tuple[str, str]]:
    files = sorted(RAW.glob("*.jsonl*")) + sorted((RAW / "c4-shards").glob("*.json.gz"))
    docs = []
    for f in files:
        for d in open_reader(f, "jsonl", ReadConfig()):
            docs.append((d.id, normalize_text(d.text)))
    return docs


def _own_datatrove() -> str | None:
    """This interpreter, when it can import datatrove (the bench extra is installed)."""
    import importlib.util

    return sys.executable if importlib.util.find_spec("datatrove") else None


def english_ids(docs: list[tuple[str, str]]) -> list[str]:
    from pipeline.data.langid import LanguageId

    lid = LanguageId()
    return [i for i, t in docs if (p := lid.predict(t))[0] == "en" and p[1] >= 0.65]


def our_chain():
    """The FineWeb chain on English, with datatrove's alpha-words variant (of tokens), so the two
    sides measure the same thing."""
    quality = GopherQualityConfig().languages
    quality["en"].alpha_words_of = "tokens"
    c4 = C4Config().languages
    c4["en"].terminal_punct_lines = False
    return [
        GopherRepetition(GopherRepetitionConfig().languages),
        GopherQuality(quality),
        C4Quality(c4),
        FineWebQuality(FineWebConfig().languages),
    ]


def run_ours(docs: list[tuple[str, str]], repeat: int) -> tuple[float, dict[str, tuple[bool, str | None]]]:
    chain, best, verdicts = our_chain(), float("inf"), {}
    for _ in range(repeat):
        verdicts = {}
        start = time.process_time()
        for doc_id, text in docs:
            verdicts[doc_id] = _one(chain, Document(doc_id, text, "bench", {"language": "en"}))
        best = min(best, time.process_time() - start)
    return best, verdicts


def _one(chain, doc: Document) -> tuple[bool, str | None]:
    for stage in chain:
        out = stage.process_one(doc)
        if isinstance(out, str):
            return False, f"{stage.name}:{out}"
        doc = out
    return True, None


def run_datatrove(python: str, docs: list[tuple[str, str]]) -> tuple[float, dict]:
    helper = Path(__file__).with_name("_datatrove_chain.py")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "docs.jsonl", Path(tmp) / "out.json"
        src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs), encoding="utf-8")
        subprocess.run(
            [python, "-I", str(helper), str(src), str(dst)], check=True, env={**os.environ, "PYTHONPATH": ""}
        )
        res = json.loads(dst.read_text(encoding="utf-8"))
    return res["seconds"], {v["id"]: (v["kept"], v["reason"]) for v in res["verdicts"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python-datatrove", default=os.environ.get("DATATROVE_PYTHON") or _own_datatrove())
    parser.add_argument("--repeat", type=int, default=3, help="best of N for our chain")
    args = parser.parse_args(argv)
    docs = load_docs()
    mb = sum(len(t.encode()) for _, t in docs) / 1e6
    ours_s, ours = run_ours(docs, args.repeat)
    print(f"documents: {len(docs)} ({mb:.1f} MB); ours kept {sum(k for k, _ in ours.values())}")
    print(f"ours:      {len(docs) / ours_s:8.0f} docs/s/core  {mb / ours_s:6.2f} MB/s/core")
    if not args.python_datatrove:
        print("datatrove: skipped (pip install -e .[bench], or pass --python-datatrove)")
        return
    dt_s, theirs = run_datatrove(args.python_datatrove, docs)
    print(f"datatrove: {len(docs) / dt_s:8.0f} docs/s/core  {mb / dt_s:6.2f} MB/s/core")
    print(f"speed ratio ours/datatrove: {dt_s / ours_s:.1f}x")
    english = english_ids(docs)
    for label, ids in (
        ("English, lid.176 >= 0.65 (FineWeb's input)", english),
        ("all", [i for i, _ in docs]),
    ):
        agree = sum(ours[i][0] == theirs[i][0] for i in ids)
        print(f"keep/drop agreement, {label}: {agree}/{len(ids)} = {100 * agree / max(len(ids), 1):.2f}%")
        kinds = Counter(
            (ours[i][1] or "kept", theirs[i][1] or "kept") for i in ids if ours[i][0] != theirs[i][0]
        )
        for (a, b), n in kinds.most_common():
            print(f"  disagree x{n}: ours {a}  datatrove {b}")


if __name__ == "__main__":
    main()
