"""GGUF exports run by llama.cpp (through llama-cpp-python): greedy tokens, perplexity and size per type.

For each --types entry the model folder is exported with pipeline/deploy/gguf.py (which already
checks the file with transformers' GGUF reader), then llama.cpp loads it and
- tokenizes the 5 prompts: the ids must be transformers' (our tokenizer.json),
- greedy-decodes --new-tokens tokens after each prompt, compared with transformers on the source
  folder (fp32) and with transformers on the same GGUF file (same rounded weights, other kernels),
- scores the --data tokens in windows of --seq-len: perplexity next to transformers' on the source.
Prints one JSON line per type and a table; the f32 row is the control (it must agree exactly,
up to ties in the arithmetic).

llama-cpp-python has no wheel for this platform: pip builds llama.cpp from source (cmake and a C++
compiler; about 30 min on 2 busy cores). `pip install -e ".[bench]"` installs it. Where the CPU
advertises AMX but the kernel does not grant it (some VMs), a default (-march=native) build dies
with "Illegal instruction" on the quantized types; build without native flags then:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install llama-cpp-python

    python bench/gguf_llamacpp.py --model runs/sft_sample/hf --data out/wiki_sample/tokens
    python bench/gguf_llamacpp.py --model runs/sft_sample/hf --types f32 f16 q8_0 q4_0 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.deploy.gguf import export_gguf  # noqa: E402
from pipeline.finetune.generate import load_model  # noqa: E402
from pipeline.finetune.perplexity import load_tokens, perplexity  # noqa: E402

PROMPTS = [
    "The json module",
    "Return a list of",
    "def main():\n    ",
    "数据处理的第一步是",
    "<|user|>\nWhat is the os module for?\n<|assistant|>\n",
]


def prompt_ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Argmax decoding with the KV cache and no logit processors (as cpp_greedy): EOS is a token
    like any other, so both sides decode exactly n tokens."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return tokens


def cpp_greedy(llm, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens from llama.cpp's logits (argmax, no sampler) and decode tokens/s."""
    llm.reset()
    llm.eval(ids)
    out, start = [], time.perf_counter()
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out, n / (time.perf_counter() - start)


def cpp_perplexity(llm, tokens: np.ndarray, seq_len: int) -> float:
    """exp(mean NLL) over non-overlapping windows, each scoring its tokens after the first."""
    total, count = 0.0, 0
    for i in range(0, tokens.size, seq_len):
        w = tokens[i : i + seq_len].tolist()
        if len(w) < 2:
            continue
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)  # (T-1, vocab)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    return math.exp(total / count)


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix: how many tokens agree before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_type(args, gtype: str, ref: dict) -> dict:
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    path = Path(args.work) / f"model-{gtype}.gguf"
    report = export_gguf(args.model, path, gtype)
    llm = Llama(
        str(path), n_ctx=max(args.seq_len, 256), logits_all=True, n_threads=args.threads, verbose=False
    )
    tok = ref["tokenizer"]
    token_ok = sum(
        llm.tokenize(p.encode(), add_bos=False, special=True) == tok.encode(p, add_special_tokens=False)
        for p in PROMPTS
    )
    same_file = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    vs_hf, vs_file, speeds = [], [], []
    for p, hf_out in zip(PROMPTS, ref["greedy"]):
        ids = prompt_ids(tok, p)
        cpp_out, speed = cpp_greedy(llm, ids, args.new_tokens)
        vs_hf.append(agreement(cpp_out, hf_out))
        vs_file.append(agreement(cpp_out, hf_greedy(same_file, ids, args.new_tokens)))
        speeds.append(speed)
    ppl = cpp_perplexity(llm, ref["tokens"], args.seq_len)
    return {
        "type": gtype,
        "mb": report["bytes"] / 2**20,
        "hf_logit_diff": report["max_abs_diff"],
        "tokenize_same": f"{token_ok}/{len(PROMPTS)}",
        "greedy_same_as_hf": f"{sum(v == args.new_tokens for v in vs_hf)}/{len(PROMPTS)}",
        "greedy_tokens_agree_hf": vs_hf,
        "greedy_same_as_hf_on_file": f"{sum(v == args.new_tokens for v in vs_file)}/{len(PROMPTS)}",
        "ppl_llamacpp": ppl,
        "ppl_change_pct": 100 * (ppl / ref["ppl"] - 1),
        "decode_tok_s": float(np.median(speeds)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="Hugging Face folder (Llama)")
    p.add_argument(
        "--data", type=Path, default=Path("configs/eval/data/ppl.jsonl"), help="perplexity text/tokens"
    )
    p.add_argument("--split", default="valid")
    p.add_argument("--types", nargs="+", default=["f32", "f16", "bf16", "q8_0", "q5_0", "q4_0"])
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=20000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="where the GGUF files go (default: a temp dir)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work = args.work or Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    model, tok = load_model(args.model)
    tokens = load_tokens(args.data, tok, args.model, args.split)[: args.max_tokens]
    greedy = [hf_greedy(model, prompt_ids(tok, p), args.new_tokens) for p in PROMPTS]
    ref = {
        "tokenizer": tok,
        "tokens": tokens,
        "greedy": greedy,
        "ppl": perplexity(model, tokens, args.seq_len)["ppl"],
    }
    print(
        json.dumps(
            {
                "model": str(args.model),
                "data": str(args.data),
                "tokens": int(tokens.size),
                "ppl_hf_fp32": ref["ppl"],
            }
        )
    )
    rows = []
    for gtype in args.types:
        rows.append(bench_type(args, gtype, ref))
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{'type':<6}{'MB':>8}{'tokenize':>10}{'greedy=HF':>11}{'=HF(file)':>11}{'ppl':>10}{'Δppl %':>9}{'tok/s':>8}"
    )
    for r in rows:
        print(
            f"{r['type']:<6}{r['mb']:>8.2f}{r['tokenize_same']:>10}{r['greedy_same_as_hf']:>11}"
            f"{r['greedy_same_as_hf_on_file']:>11}{r['ppl_llamacpp']:>10.3f}{r['ppl_change_pct']:>+9.2f}{r['decode_tok_s']:>8.0f}"
        )
    print(
        f"(transformers fp32 on the source folder: ppl {ref['ppl']:.3f}; greedy over {args.new_tokens} new tokens)"
    )


if __name__ == "__main__":
    main()
