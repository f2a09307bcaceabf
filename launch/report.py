"""Render a training run's loss, learning-rate, throughput and gradient-norm curves to a PNG.

python launch/report.py --run runs/tiny_cpu                 # -> runs/tiny_cpu/report.png
python launch/report.py --run runs/tiny_cpu --out loss.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import user_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="run folder (runs/<name>) with metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <run>/report.png)")
    args = parser.parse_args(argv)

    from pipeline.runtime.report import render_report

    with user_errors():
        print(render_report(args.run, args.out))


if __name__ == "__main__":
    main()
