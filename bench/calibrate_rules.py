"""Per-language quality thresholds the FineWeb-2 way: match the share of Wikipedia each rule drops.

    python bench/calibrate_rules.py [--language zh --wiki ../shared/data/raw/wiki/zhwiki-test-pages.xml]

For every language-dependent measure of the Gopher quality and FineWeb rules, it computes the
measure on each article of the English sample dump and of the other language's dump (after our
extraction, normalization and 200-character minimum), finds the share of English articles the
English threshold drops, and prints the other language's threshold that drops the same share
(quantile match), and the English threshold times the ratio of the two medians (median ratio);
FineWeb-2 derives its per-language thresholds from such statistics of each language's Wikipedia.
Where the English threshold drops (almost) no article, the quantile match only finds the other
sample's extreme, and the median ratio is the usable number. It also prints the share of each
dump the shipped settings (pipeline/data/config.py) keep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.data.config import FiltersConfig  # noqa: E402
from pipeline.data.extract import WikitextExtractor  # noqa: E402
from pipeline.data.features import TERMINAL_PUNCT, Features, duplicates  # noqa: E402
from pipeline.data.filters import FILTERS, MinLength, Normalize  # noqa: E402
from pipeline.data.readers import WikipediaReader  # noqa: E402
from pipeline.data.stage import run_stages  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw" / "wiki"
# measure -> (English threshold, "min": a document below it is dropped / "max": above it)
MEASURES = {
    "words": (50, "min"),
    "mean_word_length": (3.0, "min"),
    "mean_word_length_max": (10.0, "max"),
    "alpha_words": (0.8, "min"),
    "line_punct_ratio": (0.12, "min"),
    "newline_word_ratio": (0.3, "max"),
    "char_dup_ratio": (0.01, "max"),
}


def articles(path: Path, language: str) -> list:
    reader = WikipediaReader(path)
    docs, _ = run_stages([WikitextExtractor(reader.site), Normalize(), MinLength(200)], list(reader))
    for d in docs:
        d.meta["language"] = language
    return docs


def measures(text: str, language: str) -> dict[str, float]:
    feats = Features(text, language)
    content = feats.content_words or [""]
    lines = feats.nonempty_lines or [""]
    mean = sum(map(len, content)) / len(content)
    return {
        "words": len(feats.content_words),
        "mean_word_length": mean,
        "mean_word_length_max": mean,
        "alpha_words": sum(any(c.isalpha() for c in w) for w in content) / len(content),
        "line_punct_ratio": sum(line.endswith(TERMINAL_PUNCT) for line in lines) / len(lines),
        "newline_word_ratio": text.count("\n") / max(len(feats.words), 1),
        "char_dup_ratio": duplicates(lines)[1] / max(len(text) - text.count("\n"), 1),
    }


def matched_threshold(en: np.ndarray, other: np.ndarray, threshold: float, kind: str) -> tuple[float, float]:
    """(share of English dropped by `threshold`, the other language's threshold dropping that share)."""
    share = float(np.mean(en < threshold)) if kind == "min" else float(np.mean(en > threshold))
    q = share if kind == "min" else 1.0 - share
    return share, float(np.quantile(other, q))


def kept_share(docs: list, language: str) -> dict[str, float]:
    """Share of `docs` each shipped rule keeps, with every rule on and the shipped settings."""
    cfg = FiltersConfig()
    out = {}
    for name in ("gopher_repetition", "gopher_quality", "fineweb"):
        getattr(cfg, name).enabled = True
        stage = FILTERS[name](cfg, {})
        kept, _ = stage.process(list(docs))
        out[name] = len(kept) / max(len(docs), 1) if language in stage.languages else float("nan")
        getattr(cfg, name).enabled = False
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--language", default="zh")
    ap.add_argument("--wiki", type=Path, default=WIKI / "zhwiki-test-pages.xml")
    ap.add_argument(
        "--english", type=Path, default=WIKI / "enwiki-pages-articles1-p10p30302-shortened.xml.bz2"
    )
    args = ap.parse_args(argv)
    en_docs, other_docs = articles(args.english, "en"), articles(args.wiki, args.language)
    en = [measures(d.text, "en") for d in en_docs]
    other = [measures(d.text, args.language) for d in other_docs]
    print(f"articles: en {len(en)}, {args.language} {len(other)}")
    print(
        f"{'measure':>22} {'en thr':>8} {'en drop':>8} {'quantile':>9} {'med.ratio':>9}  medians en / other"
    )
    for name, (thr, kind) in MEASURES.items():
        a, b = np.array([m[name] for m in en]), np.array([m[name] for m in other])
        share, matched = matched_threshold(a, b, thr, kind)
        ratio = thr * np.median(b) / np.median(a) if np.median(a) else float("nan")
        print(
            f"{name:>22} {thr:>8} {share:>8.1%} {matched:>9.3f} {ratio:>9.3f}  "
            f"{np.median(a):.3f} / {np.median(b):.3f}"
        )
    for lang, docs in (("en", en_docs), (args.language, other_docs)):
        shares = ", ".join(f"{k} {v:.1%}" for k, v in kept_share(docs, lang).items())
        print(f"shipped settings keep on {lang} wiki: {shares}")


if __name__ == "__main__":
    main()
