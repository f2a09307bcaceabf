"""Loader throughput against what a training step consumes, measured in the same run.

    python bench/loader.py                                    # synthetic 32k-vocab shards, the tiny model
    python bench/loader.py --tokens out/wiki_sample/tokens --seq-len 128

Loader side: `TokenLoader.micro_batches` for consecutive optimizer steps of one data-parallel
rank (shuffled order, memory-mapped shards, torch tensors out), and the same through a
two-way `BlendedLoader` (0.3 / 0.7). Training side: forward + backward + AdamW step of the
model in `--model` on one micro batch of the same shape, on this CPU. Prints samples/s of each
and the ratio loader / training: it must stay well above 1 for the loader never to be the
bottleneck (a real model on a GPU steps faster than this CPU: divide the loader's rate by your
own samples/s per rank). Also prints the loaders' anonymous memory, which does not grow with
the corpus (no shuffle table: the order is computed per index).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tokens", type=Path, help="a token folder with manifest.json (default: synthetic shards)"
    )
    p.add_argument("--synthetic-tokens", type=float, default=50e6, help="tokens of the synthetic corpus")
    p.add_argument("--shards", type=int, default=16, help="shards of the synthetic corpus")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary of the synthetic corpus and model")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=64, help="samples per optimizer step (one rank here)")
    p.add_argument("--micro", type=int, default=4, help="samples per micro batch")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps read by the loader")
    p.add_argument("--model", type=Path, default=REPO / "configs" / "model" / "tiny.yaml")
    return p.parse_args(argv)


def synthetic_shards(folder: Path, tokens: int, shards: int, vocab: int) -> list[Path]:
    """Random documents (16 to 4,000 tokens each, ending in EOS id 2) in `shards` .bin/.idx pairs."""
    from pipeline.data.indexed import dtype_for_vocab, write_indexed

    rng, prefixes = np.random.default_rng(0), []
    for k in range(shards):
        lengths = rng.integers(16, 4000, size=max(1, int(tokens / shards / 2000)))
        flat = rng.integers(4, vocab, size=int(lengths.sum()))
        flat[np.cumsum(lengths) - 1] = 2
        docs = np.split(flat, np.cumsum(lengths)[:-1])
        prefixes.append(folder / f"synthetic-{k}")
        write_indexed(prefixes[-1], docs, dtype_for_vocab(vocab))
    return prefixes


def anon_rss_mb() -> float:
    """Resident anonymous memory (heap, arrays); memory-mapped shard pages are file-backed, not counted."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: peak RSS instead


def loader_rate(ld, args: argparse.Namespace) -> float:
    """Samples/s of reading `--steps` optimizer steps (starting mid-corpus, as after a resume)."""
    start = 10**6 * args.global_batch
    ld.micro_batches(start, args.global_batch, args.micro, 0, 1)  # page in the index, warm caches
    t0 = time.perf_counter()
    for s in range(args.steps):
        ld.micro_batches(start + s * args.global_batch, args.global_batch, args.micro, 0, 1)
    return args.steps * args.global_batch / (time.perf_counter() - t0)


def train_rate(args: argparse.Namespace, vocab: int) -> float:
    """Samples/s of forward + backward + AdamW step on micro batches of (micro, seq_len) tokens."""
    import torch

    from pipeline.config import load_config
    from pipeline.model.build import build_model
    from pipeline.model.config import ModelConfig

    cfg = load_config(ModelConfig, args.model, [f"vocab_size={vocab}", f"max_seq_len={args.seq_len}"])
    model = build_model(cfg, bos_id=1, eos_id=2, pad_id=3, partitioned=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(4, vocab, (args.micro, args.seq_len + 1))
    times = []
    for _ in range(6):  # the first is a warm-up
        t0 = time.perf_counter()
        model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return args.micro / min(times[1:])


def main(argv: list[str] | None = None) -> None:
    from pipeline.train.loader import BlendedLoader, TokenLoader, open_split

    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        if args.tokens:
            prefixes = open_split(args.tokens, "train", checksums=False)
        else:
            prefixes = synthetic_shards(work, int(args.synthetic_tokens), args.shards, args.vocab)
        rss0 = anon_rss_mb()
        ld = TokenLoader(prefixes, args.seq_len, seed=0)
        half = max(1, len(prefixes) // 2)
        parts = [TokenLoader(p, args.seq_len, seed=0) for p in (prefixes[:half], prefixes[half:] or prefixes)]
        blend = BlendedLoader(parts, [0.3, 0.7])
        rates = {"loader": loader_rate(ld, args), "blended loader": loader_rate(blend, args)}
        rss = anon_rss_mb() - rss0
        rates["training step"] = train_rate(args, args.vocab)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n_tok = ld.data.num_tokens
    print(
        f"corpus: {n_tok / 1e6:.1f} M tokens in {len(prefixes)} shards, {len(ld):,} samples of {args.seq_len} + 1"
    )
    for name, rate in rates.items():
        print(f"{name:15s} {rate:12,.0f} samples/s")
    print(
        f"ratio loader / training step         = {rates['loader'] / rates['training step']:.1f}  (must be >> 1)"
    )
    print(f"ratio blended loader / training step = {rates['blended loader'] / rates['training step']:.1f}")
    print(f"loaders' anonymous memory: {rss:.1f} MB (the shards are memory-mapped; no per-sample tables)")


if __name__ == "__main__":
    main()
