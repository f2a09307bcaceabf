"""Per-language keep rates of the quality rules on a data config's inputs, without Ray.

    python bench/keep_rates.py --config configs/data/all_samples.yaml [--dump kept_dropped.jsonl]

Every input goes through its reader, extraction, normalization and minimum length, then the
`filters` chain of the config, one stage at a time. For documents that the quality rules see
(sources not in `filters.skip_sources`), it counts per language (as language ID labels them) how
many entered the first rule after language ID and how many survived the last, and which rule
dropped the others. `--dump` writes every such document (language, kept or the dropping rule,
source, text) as JSON lines, for reading them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.config import load_config  # noqa: E402
from pipeline.data.config import DataConfig  # noqa: E402
from pipeline.data.filters import build_filters, build_quality  # noqa: E402
from pipeline.data.formats import detect_format, extraction_stages, open_reader  # noqa: E402
from pipeline.data.runner import resolve_inputs  # noqa: E402
from pipeline.data.stage import run_stages  # noqa: E402


def tally(cfg: DataConfig, dump) -> tuple[dict, Counter]:
    """({language: {"in": n, "kept": k, dropped reason: n}}, documents per input format)."""
    rates: dict = defaultdict(Counter)
    formats: Counter = Counter()
    quality = build_quality(cfg.filters)
    skip = set(cfg.filters.skip_sources)
    for path in resolve_inputs(cfg.inputs):
        fmt = detect_format(path) if cfg.format == "auto" else cfg.format
        reader = open_reader(path, fmt, cfg.read)
        stages = [*extraction_stages(fmt, reader.site, cfg.read), *build_filters(cfg.clean)]
        docs, _ = run_stages(stages, list(reader))
        docs = [d for d in docs if d.source not in skip]
        formats[fmt] += len(docs)
        for d in docs:
            _one_doc(d, quality, rates, dump, path.name)
    return rates, formats


def _one_doc(doc, quality, rates, dump, file_name: str) -> None:
    verdict, lang, text = "kept", None, doc.text
    for stage in quality:
        out, counts = stage.process([doc])
        if stage.name == "langid":
            if not out:
                return  # not a configured language: outside the per-language rates
            lang = out[0].meta.get("language")
        if not out:
            verdict = next(iter({**counts.dropped, **counts.errors}))
            break
        doc = out[0]
    lang = lang or doc.meta.get("language") or "unknown"
    rates[lang]["in"] += 1
    rates[lang]["kept" if verdict == "kept" else verdict] += 1
    if dump is not None:
        row = {"language": lang, "verdict": verdict, "file": file_name, "id": doc.id, "text": text}
        dump.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--dump", help="write every rated document as JSON lines here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(DataConfig, args.config, args.overrides)
    dump = open(args.dump, "w", encoding="utf-8") if args.dump else None  # noqa: SIM115
    try:
        rates, formats = tally(cfg, dump)
    finally:
        if dump is not None:
            dump.close()
    print(f"documents the quality rules see, by input format: {dict(formats)}")
    print(f"{'language':>8} {'in':>6} {'kept':>6} {'rate':>7}  drops")
    for lang, c in sorted(rates.items(), key=lambda kv: -kv[1]["in"]):
        drops = {k: v for k, v in c.most_common() if k not in ("in", "kept")}
        print(f"{lang:>8} {c['in']:>6} {c['kept']:>6} {c['kept'] / c['in']:>7.1%}  {drops}")
    other = [c for lang, c in rates.items() if lang != "en"]
    n_in, n_kept = sum(c["in"] for c in other), sum(c["kept"] for c in other)
    print(f"all but en: {n_kept} of {n_in} kept ({n_kept / max(n_in, 1):.1%})")


if __name__ == "__main__":
    main()
