"""Train a SentencePiece tokenizer on cleaned shards; writes tokenizers/<name>/ (SentencePiece + Hugging Face files).

    python launch/prepare_data.py --config configs/data/wiki_sample.yaml steps=[clean]
    python launch/train_tokenizer.py --config configs/tokenizer/wiki_sample.yaml
    python launch/train_tokenizer.py --config configs/tokenizer/wiki_sample.yaml vocab_size=8000 name=wiki_8k

The folder loads with AutoTokenizer.from_pretrained(path) and gives the same ids as SentencePiece.
"""

from __future__ import annotations

import argparse

from pipeline.config import add_config_args, load_config, located
from pipeline.errors import user_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    args = parser.parse_args(argv)

    from pipeline.log import setup_logging
    from pipeline.tokenizer.config import TokenizerConfig
    from pipeline.tokenizer.train import train_tokenizer

    setup_logging("INFO")
    with user_errors():
        cfg = load_config(TokenizerConfig, args.config, args.overrides)
        with located(cfg):
            print(train_tokenizer(cfg))


if __name__ == "__main__":
    main()
