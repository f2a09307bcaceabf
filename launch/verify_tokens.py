"""Check a token folder against its manifest.json (files, sha256, counts, tokenizer) and print its totals.

python launch/verify_tokens.py out/wiki_sample/tokens
python launch/verify_tokens.py out/wiki_sample/tokens --no-checksums --tokenizer tokenizers/wiki_sample
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import GristmillError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tokens_dir", type=Path, help="folder holding manifest.json and the .bin/.idx shards")
    parser.add_argument("--no-checksums", action="store_true", help="skip the sha256 of every file (fast)")
    parser.add_argument(
        "--tokenizer", type=Path, help="also require the shards to come from this tokenizer folder"
    )
    args = parser.parse_args(argv)

    from pipeline.data.manifest import verify_manifest
    from pipeline.tokenizer.hf import fingerprint

    try:
        fp = fingerprint(args.tokenizer) if args.tokenizer else None
        manifest = verify_manifest(args.tokens_dir, checksums=not args.no_checksums, fingerprint=fp)
    except GristmillError as exc:  # a user error: one line, no traceback
        sys.exit(f"error: {exc}")
    print(json.dumps({"ok": True, "dtype": manifest["dtype"], "totals": manifest["totals"]}, indent=2))


if __name__ == "__main__":
    main()
