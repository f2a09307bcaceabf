"""Does our data prep make better training data? The same small Llama, trained on the web samples
after each stage of the pipeline in turn, scored on held-out Wikipedia text.

Rows (each adds one step to the row above; all read the same web inputs of ../shared/data/raw/web):
  raw        extracted text only: no filters, no min length, no dedup
  +langid    lid.176, English and Chinese (the two languages of the held-out text), min length 200, PII
  +gopher    Gopher repetition and quality rules, per language (en, and zh from the wiki samples)
  +c4        C4 rules (English only, as FineWeb-2; FineWeb's setting: the terminal-punctuation line rule off)
  +fineweb   FineWeb's three rules (en), FineWeb-2's changes for zh
  +decontam  drop web documents sharing a 13-gram with the held-out Wikipedia documents
  +dedup     exact + MinHash near-duplicate removal
  +quality   the learned fastText quality model, best half of the job kept by the `select` step
             (DCLM's recipe, which keeps 10% of a far larger pool)   (= the full pipeline)
Every row trains the same model, with the same tokenizer (SentencePiece trained on a neutral
mix: all of the raw web text plus the Wikipedia training half), for the same number of tokens, 3
seeds each. Evaluation: the English and Chinese Wikipedia sample documents whose seeded hash of
the id puts them in the held-out half; nothing held out reaches the tokenizer, the quality
model (whose positives are the other half and instruction answers) or any training row. A row
whose training tokens equal an earlier row's (a stage that removed nothing) reuses its runs.

Three resumable phases, results cached under --out (per-row shards, token files, one JSON per run):
    python bench/ablation.py --size tiny                 # minutes: the whole thing, small
    nice -n 5 python bench/ablation.py --size full       # the table: (a) and (b) first, each run cached
    python bench/ablation.py prep  --out out/ablation    # data only (needs Ray and the data libraries)
    python bench/ablation.py train --out out/ablation --size full   # torch + transformers only
    python bench/ablation.py report --out out/ablation --size full  # table, ablation.md, ablation.png
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _ablation_train import SIZES, train_and_eval  # noqa: E402

log = logging.getLogger("ablation")
RAW = REPO.parent / "shared" / "data" / "raw"
WEB = ["web/*.warc.gz", "web/*.warc.wet.gz", "web/*.jsonl*", "web/c4-shards/*.json.gz"]
WIKI = ["wiki/enwiki*.xml.bz2", "wiki/zhwiki*.xml"]
ROWS = ["raw", "+langid", "+gopher", "+c4", "+fineweb", "+decontam", "+dedup", "+quality"]
FILTERS = {"+gopher": ["gopher_repetition", "gopher_quality"], "+c4": ["c4"], "+fineweb": ["fineweb"]}
SEEDS = (0, 1, 2)
HOLDOUT_SALT = "ablation-holdout"
HELDOUT = "heldout_wiki.jsonl.zst"  # the held-out documents, as the +decontam row's evaluation set


def held_out(doc_id: str) -> bool:
    """The fixed split: half the Wikipedia documents, by a salted hash of the id."""
    return hashlib.blake2b(f"{HOLDOUT_SALT}\x00{doc_id}".encode(), digest_size=8).digest()[0] < 128


def row_config(row: str, out: Path, quality_dir: Path | None, top_fraction: float):
    """The data-prep config of one row: configs/data/all_samples.yaml with the row's steps switched on."""
    from pipeline.config import load_config
    from pipeline.data.config import DataConfig

    upto = ROWS.index(row)
    on = {f for r in ROWS[2 : upto + 1] for f in FILTERS.get(r, [])}
    on |= {"langid", "pii"} if upto >= 1 else set()
    on |= {"decontam"} if upto >= ROWS.index("+decontam") else set()
    names = ["langid", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii", "decontam"]
    overrides = [f"filters.{n}.enabled={str(n in on).lower()}" for n in names]
    overrides += ["filters.langid.languages=[en, zh]", "filters.skip_sources=[]", "ray.num_cpus=2"]
    overrides += [
        f"filters.decontam.eval_sets=[{{name: heldout_wiki, path: {out / HELDOUT}, fields: [text]}}]"
    ]
    overrides += ["clean.min_chars=0"] if row == "raw" else []
    steps = ["clean", "dedup"] if upto >= ROWS.index("+dedup") else ["clean"]
    if row == "+quality":
        steps.append("select")
        overrides += [
            "filters.quality_model.enabled=true", f"filters.quality_model.model={quality_dir}",
            "filters.quality_model.keep=top_fraction", f"filters.quality_model.top_fraction={top_fraction}",
        ]  # fmt: skip
    overrides.append(f"steps=[{', '.join(steps)}]")
    cfg = load_config(DataConfig, REPO / "configs" / "data" / "all_samples.yaml", overrides)
    inputs = [str(RAW / pattern) for pattern in WEB]
    return dataclasses.replace(
        cfg, inputs=inputs, output_dir=out / "rows" / row.lstrip("+"), name=f"ablation {row}"
    )


def read_docs(folder: Path) -> list[dict]:
    """Every document of the shards in a folder (sorted by file name: a stable order)."""
    from pipeline.io import read_jsonl_zst

    return [row for path in sorted(folder.glob("*.jsonl.zst")) for row in read_jsonl_zst(path)]


def prep_wiki(out: Path) -> dict[str, list[dict]]:
    """Clean the en/zh Wikipedia samples (no quality filters) and split them by `held_out`."""
    from pipeline.config import load_config
    from pipeline.data.config import DataConfig
    from pipeline.data.runner import prepare_data

    wiki_dir = out / "wiki"
    cfg = load_config(
        DataConfig, None, ["inputs=[x]", f"output_dir={wiki_dir}", "steps=[clean]", "ray.num_cpus=2"]
    )
    prepare_data(dataclasses.replace(cfg, inputs=[str(RAW / p) for p in WIKI]))
    split: dict[str, list[dict]] = {"train": [], "eval_en": [], "eval_zh": []}
    for doc in read_docs(wiki_dir / "cleaned"):
        lang = "zh" if doc["id"].startswith("zhwiki") else "en"
        split[f"eval_{lang}" if held_out(doc["id"]) else "train"].append(doc)
    from pipeline.io import write_jsonl_zst

    write_jsonl_zst(out / HELDOUT, split["eval_en"] + split["eval_zh"])
    return split


def prep_quality_model(out: Path, wiki_train: list[dict], raw_docs: list[dict]) -> Path:
    """The DCLM-style classifier: Wikipedia training half + instruction answers vs. raw web text."""
    from pipeline.data.quality_train import QualityTrainConfig, TextSource, train_quality_model
    from pipeline.io import write_jsonl_zst

    write_jsonl_zst(out / "quality_pos_wiki.jsonl.zst", wiki_train)
    write_jsonl_zst(out / "quality_neg_web.jsonl.zst", raw_docs)
    sft = RAW / "sft"
    cfg = QualityTrainConfig(
        name="quality",
        output_root=out,
        positives=[
            TextSource(str(out / "quality_pos_wiki.jsonl.zst")),
            TextSource(str(sft / "alpaca_en_demo.json"), ["output"]),
            TextSource(str(sft / "alpaca_zh_demo.json"), ["output"]),
            TextSource(str(sft / "self-instruct-seed_tasks.jsonl"), ["instances.output"]),
        ],
        negatives=[TextSource(str(out / "quality_neg_web.jsonl.zst"))],
        max_chars=4000,
    )
    return train_quality_model(cfg)


def prep(out: Path, top_fraction: float) -> None:
    """Phase 1: every row's documents, the tokenizer, and the token files the training reads."""
    from pipeline.data.runner import prepare_data

    out.mkdir(parents=True, exist_ok=True)
    wiki = prep_wiki(out)
    docs: dict[str, list[dict]] = {}
    quality_dir = None
    for row in ROWS:
        if row == "+quality" and quality_dir is None:
            quality_dir = prep_quality_model(out, wiki["train"], docs["raw"])
        report = prepare_data(row_config(row, out, quality_dir, top_fraction))
        folder = "selected" if "select" in report else "deduped" if "dedup" in report else "cleaned"
        docs[row] = read_docs(out / "rows" / row.lstrip("+") / folder)
        zh = sum((d.get("meta") or {}).get("language") == "zh" for d in docs[row])
        log.info("row %-9s %6d documents (%d zh), %9d characters", row, len(docs[row]), zh,
                 sum(len(d["text"]) for d in docs[row]))  # fmt: skip
    tok = train_tokenizer(out, docs["raw"] + wiki["train"])
    write_tokens(
        out, tok, {**{r: docs[r] for r in ROWS}, "eval_en": wiki["eval_en"], "eval_zh": wiki["eval_zh"]}
    )


def train_tokenizer(out: Path, docs: list[dict]) -> Path:
    """SentencePiece (4k BPE, our trainer's settings) on the neutral mix; returns the model file."""
    from pipeline.tokenizer.config import TokenizerConfig
    from pipeline.tokenizer.train import train_model

    path = out / "tokenizer.model"
    if not path.is_file():
        lines = [line for d in docs for line in d["text"].split("\n") if line.strip()]
        path.write_bytes(train_model(lines, TokenizerConfig(name="ablation", inputs=["-"], vocab_size=4000)))
    return path


def write_tokens(out: Path, tok: Path, sets: dict[str, list[dict]]) -> None:
    """One `tokens/<name>.npy` per row and eval set: each document's ids then EOS (id 2)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    (out / "tokens").mkdir(exist_ok=True)
    meta = {"vocab": sp.get_piece_size(), "sets": {}}
    for name, docs in sets.items():
        ids = [i for piece in sp.encode([d["text"] for d in docs]) for i in (*piece, 2)]
        np.save(out / "tokens" / f"{name.lstrip('+')}.npy", np.asarray(ids, dtype=np.uint16))
        meta["sets"][name] = {
            "documents": len(docs),
            "zh_documents": _zh_documents(docs),
            "tokens": len(ids),
            "chars": sum(len(d["text"]) for d in docs),
            "sha256": hashlib.sha256(np.asarray(ids, dtype=np.uint16).tobytes()).hexdigest(),
        }
    (out / "tokens" / "meta.json").write_text(json.dumps(meta, indent=2))


def _zh_documents(docs: list[dict]) -> int:
    """Documents lid.176 labels Chinese (on every row, raw included, with the pipeline's model)."""
    from pipeline.data.langid import LanguageId

    lid = LanguageId()
    return sum(lid.predict(d["text"])[0] == "zh" for d in docs)


def train(out: Path, size_name: str, max_runs: int = 0) -> None:
    """Phase 2: every (row, seed) not already done with this size (at most `max_runs`, 0: all); one JSON each."""
    size = SIZES[size_name]
    meta = json.loads((out / "tokens" / "meta.json").read_text())
    evals = {lang: np.load(out / "tokens" / f"eval_{lang}.npy") for lang in ("en", "zh")}
    done_dir = out / "results" / size_name
    done_dir.mkdir(parents=True, exist_ok=True)
    ends = [
        (r, s) for r in (ROWS[0], ROWS[-1]) for s in SEEDS
    ]  # (a) and (b) first: the goal, even if stopped
    middle = [(r, s) for s in SEEDS for r in ROWS[1:-1]]  # then seed by seed, every row
    todo = [(r, s) for r, s in ends + middle if not (done_dir / f"{r.lstrip('+')}-s{s}.json").is_file()]
    for row, seed in todo[: max_runs or None]:
        if same := _same_tokens_as(meta, row, done_dir, seed):  # the stage removed nothing: same run
            res = {**json.loads(same.read_text()), "row": row, "reused": same.name}
            (done_dir / f"{row.lstrip('+')}-s{seed}.json").write_text(json.dumps(res, indent=2))
            continue
        tokens = np.load(out / "tokens" / f"{row.lstrip('+')}.npy")
        res = train_and_eval(tokens, evals, meta["vocab"], seed, size)
        res.update(row=row, seed=seed, train_tokens_available=len(tokens))
        (done_dir / f"{row.lstrip('+')}-s{seed}.json").write_text(json.dumps(res, indent=2))
        ev = res["eval"]
        log.info(
            "%-9s seed %d: eval en %.4f zh %.4f (%.0f s)",
            row,
            seed,
            ev["en"]["loss"],
            ev["zh"]["loss"],
            res["seconds"],
        )


def _same_tokens_as(meta: dict, row: str, done_dir: Path, seed: int) -> Path | None:
    """The finished run of an earlier row with the same training tokens and seed, if there is one."""
    for earlier in ROWS[: ROWS.index(row)]:
        path = done_dir / f"{earlier.lstrip('+')}-s{seed}.json"
        if meta["sets"][earlier]["sha256"] == meta["sets"][row]["sha256"] and path.is_file():
            return path
    return None


def summarize(out: Path, size_name: str) -> list[dict]:
    """Mean and std over seeds of the held-out loss per row (token-weighted over en + zh, and each)."""
    meta = json.loads((out / "tokens" / "meta.json").read_text())
    table = []
    for row in ROWS:
        runs = [
            json.loads(p.read_text())
            for p in sorted((out / "results" / size_name).glob(f"{row.lstrip('+')}-s*.json"))
        ]
        if not runs:
            continue
        both = [_weighted(r["eval"]) for r in runs]
        entry = {
            "row": row,
            "seeds": len(runs),
            "mean": float(np.mean(both)),
            "std": float(np.std(both, ddof=1)) if len(runs) > 1 else 0.0,
        }
        for lang in ("en", "zh"):
            losses = [r["eval"][lang]["loss"] for r in runs]
            entry[lang] = float(np.mean(losses))
            entry[f"{lang}_std"] = float(np.std(losses, ddof=1)) if len(runs) > 1 else 0.0
        sets = meta["sets"][row]
        entry.update(docs=sets["documents"], zh_docs=sets["zh_documents"], tokens=sets["tokens"])
        table.append(entry)
    return table


def _std(key: str) -> str:
    return "std" if key == "mean" else f"{key}_std"


def _weighted(ev: dict) -> float:
    return sum(v["loss"] * v["tokens"] for v in ev.values()) / sum(v["tokens"] for v in ev.values())


def report(out: Path, size_name: str) -> str:
    """Print and write the table (ablation.md) and the bar chart (ablation.png); the verdict on (b) vs (a)."""
    table = summarize(out, size_name)
    lines = [
        f"| row | documents (zh) | train tokens | held-out loss (mean ± std, {table[0]['seeds'] if table else 0} seeds) | en | zh |",
        "|---|---:|---:|---|---:|---:|",
    ]
    lines += [
        f"| {t['row']} | {t['docs']:,} ({t['zh_docs']:,}) | {t['tokens']:,} "
        f"| {t['mean']:.4f} ± {t['std']:.4f} "
        f"| {t['en']:.4f} ± {t['en_std']:.4f} | {t['zh']:.4f} ± {t['zh_std']:.4f} |"
        for t in table
    ]
    by = {t["row"]: t for t in table}
    if "raw" in by and "+quality" in by:
        a, b = by["raw"], by["+quality"]
        lines.append("")
        for key, name in (("mean", "en + zh"), ("en", "English"), ("zh", "Chinese")):
            gap, sd = a[key] - b[key], max(a[_std(key)], b[_std(key)])
            verdict = "met" if gap > 2 * sd else "NOT met"
            lines.append(
                f"{name}: (b) full pipeline vs (a) raw {gap:+.4f} nats/token (2 std = {2 * sd:.4f}): goal {verdict}."
            )
    text = "\n".join(lines)
    (out / f"ablation-{size_name}.md").write_text(text + "\n")
    _plot(out / f"ablation-{size_name}.png", table, size_name)
    return text


def _plot(path: Path, table: list[dict], size_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("mean", "en", "zh"), ("en + zh", "English", "Chinese")):
        means = [t[key] for t in table]
        stds = [t[_std(key)] for t in table]
        ax.bar([t["row"] for t in table], means, yerr=stds, capsize=4, color="#4c72b0")
        low, high = min(m - e for m, e in zip(means, stds)), max(m + e for m, e in zip(means, stds))
        ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
        ax.set_title(f"held-out Wikipedia, {title}")
        ax.tick_params(axis="x", labelrotation=45)
    axes[0].set_ylabel("loss (nats/token), mean ± std over seeds")
    fig.suptitle(f"Training ablation ({size_name}): each data-prep stage added in turn")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", nargs="?", default="all", choices=["all", "prep", "train", "report"])
    p.add_argument("--out", type=Path, default=REPO / "out" / "ablation")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument(
        "--top-fraction", type=float, default=0.5, help="share the quality model keeps (+quality row)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--max-runs", type=int, default=0, help="train at most this many (row, seed) runs now (0: all)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.phase in ("all", "prep") and not (args.out / "tokens" / "meta.json").is_file():
        prep(args.out, args.top_fraction)
    if args.phase in ("all", "train"):
        train(args.out, args.size, args.max_runs)
    if args.phase in ("all", "report", "train"):
        print(report(args.out, args.size))
    log.info("done in %.0f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
