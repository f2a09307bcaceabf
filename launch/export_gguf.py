"""Export a Llama model as one GGUF file: a Hugging Face folder, a fine-tuning run (its hf/ export)
or a pretraining run (its latest checkpoint, exported first).

    python launch/export_gguf.py --run runs/sft_sample --out out/sft_sample-q8_0.gguf --type q8_0
    python launch/export_gguf.py --run runs/wiki_sample --out out/wiki_sample-f16.gguf

Loads in llama.cpp, Ollama and other GGUF runtimes, tokenizer and chat template included. Types:
f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (for K-quants, export f16 and run llama.cpp's
llama-quantize). The file appears only after transformers' GGUF reader reproduces the source's
logits within the type's tolerance (pipeline/deploy/gguf.py); --no-verify skips that check (it
holds two fp32 copies of the model in memory). Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipeline.errors import user_errors


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="Hugging Face folder or run folder (runs/<name>)")
    p.add_argument("--out", type=Path, required=True, help="GGUF file to write (replaced atomically)")
    p.add_argument("--type", default="f16", help="type of the 2-D weights (f16, q8_0, ...; see above)")
    p.add_argument("--name", default=None, help="general.name in the file (default: the folder's name)")
    p.add_argument("--no-verify", action="store_true", help="skip the transformers reload check")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipeline.deploy.gguf import export_gguf
    from pipeline.log import setup_logging

    setup_logging("INFO")
    with user_errors():
        report = export_gguf(args.run, args.out, args.type, name=args.name, verify=not args.no_verify)
        print(json.dumps(report))


if __name__ == "__main__":
    main()
