"""Scoring throughput of the learned quality filter, in documents per CPU second (= per core).

    python bench/quality_score.py [--repeat 3] [--model DIR] [--raw ../shared/data/raw]

Trains a quality model on the samples (instruction answers vs. raw web text, a few seconds) unless
--model names one, then scores every web JSONL sample document (mean ~4.5 k characters) with
`QualityModelFilter.process`, as the clean step does, and, in the same process on the same
documents, fastText lid.176 on the full text (the language-ID model our langid stage runs) as
the baseline. It also times decontamination (`Decontaminate.process`, the index built from the
self-instruct tasks and both Alpaca demo sets, English and Chinese) on the same documents. Times are CPU seconds of this process, so other jobs on the machine skew them less
than wall time; the ratio ours / lid.176 is the number to compare across machines. Goal: >= 2,000
documents per second per core.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.data.document import Document  # noqa: E402
from pipeline.data.quality_model import QualityModelConfig, QualityModelFilter  # noqa: E402
from pipeline.data.quality_train import QualityTrainConfig, TextSource, train_quality_model  # noqa: E402
from pipeline.data.records import field_texts, iter_records  # noqa: E402

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw"
WEB = {
    "CC-MAIN-20190717121559-20190717143559-00140.dolma.jsonl.gz": "text",
    "c4-en-sample.jsonl": "text",
    "ccnet-cc_en_head-0091.jsonl.gz": "text",
    "ccnet-cc_en_head-0174.jsonl.gz": "text",
    "redpajama-cc-2023-06-sample.jsonl": "text",
    "oscar-2201-multilingual-sample.jsonl.zst": "content",
}


def web_documents(raw: Path) -> list[Document]:
    docs = []
    for name, field in WEB.items():
        for i, rec in enumerate(iter_records(raw / "web" / name)):
            docs += [Document(f"{name}/{i}", t, "web") for t in field_texts(rec, [field])]
    return docs


def sample_model(root: Path, raw: Path) -> Path:
    cfg = QualityTrainConfig(
        name="bench",
        output_root=root,
        positives=[
            TextSource(str(raw / "sft" / f"alpaca_{lang}_demo.json"), ["output"]) for lang in ("en", "zh")
        ],
        negatives=[TextSource(str(raw / "web" / name), [field]) for name, field in WEB.items()],
    )
    return train_quality_model(cfg)


def cpu_rate(fn, docs: list[Document], repeat: int) -> float:
    """Best documents per CPU second over `repeat` passes."""
    best = 0.0
    for _ in range(repeat):
        t = time.process_time()
        fn(docs)
        best = max(best, len(docs) / (time.process_time() - t))
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--model", type=Path, help="a trained model folder (default: train one on the samples)")
    p.add_argument("--raw", type=Path, default=RAW, help="the raw samples folder (its web/ and sft/)")
    args = p.parse_args(argv)
    docs = web_documents(args.raw)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or sample_model(Path(tmp), args.raw)
        stage = QualityModelFilter(QualityModelConfig(enabled=True, model=model, keep="all"))
        ours = cpu_rate(
            lambda d: stage.process([Document(x.id, x.text, x.source) for x in d]), docs, args.repeat
        )
    from pipeline.data.langid import LanguageId

    lid = LanguageId(max_chars=10**9)
    base = cpu_rate(lambda d: [lid.predict(x.text) for x in d], docs, args.repeat)
    chars = sum(len(d.text) for d in docs) / len(docs)
    print(f"{len(docs)} documents, mean {chars:,.0f} characters")
    print(
        f"quality model (QualityModelFilter.process): {ours:8,.0f} docs/s per core  {ours * chars / 1e6:6.1f} MB/s"
    )
    print(
        f"lid.176 full text (baseline):               {base:8,.0f} docs/s per core  {base * chars / 1e6:6.1f} MB/s"
    )
    print(
        f"ratio ours / lid.176: {ours / base:.2f}x; goal >= 2,000 docs/s per core: {'met' if ours >= 2000 else 'NOT met'}"
    )
    stage, label = decontam_stage(args.raw)
    rate = cpu_rate(lambda d: stage.process([Document(x.id, x.text, x.source) for x in d]), docs, args.repeat)
    print(
        f"decontam ({label}): {rate:8,.0f} docs/s per core  {rate * chars / 1e6:6.1f} MB/s"
        f"  ({rate / base:.2f}x lid.176)"
    )


def decontam_stage(raw: Path) -> tuple:
    """The decontam stage over the instruction sets (the web samples do not contain them)."""
    from pipeline.data.decontam import DecontamConfig, Decontaminate, EvalSetConfig, build_index

    sets = [
        EvalSetConfig(
            "self_instruct",
            raw / "sft" / "self-instruct-seed_tasks.jsonl",
            ["instruction", "instances.output"],
        ),
        EvalSetConfig("alpaca_en", raw / "sft" / "alpaca_en_demo.json", ["instruction", "output"]),
        EvalSetConfig("alpaca_zh", raw / "sft" / "alpaca_zh_demo.json", ["instruction", "output"]),
    ]
    cfg = DecontamConfig(enabled=True, eval_sets=sets)
    index = build_index(cfg)
    return Decontaminate(cfg, index), f"{len(index.keys):,} n-grams of {len(sets)} sets"


if __name__ == "__main__":
    main()
