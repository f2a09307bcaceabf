"""Helper of bench/extract.py, run in a child interpreter that has datatrove: datatrove's WarcReader +
Trafilatura(favour_precision=True) (the FineWeb recipe) over the .warc.gz files in argv[1];
prints one JSON line {"docs", "seconds"}."""

import json
import sys
import time

from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.readers import WarcReader


def main() -> None:
    start = time.perf_counter()
    reader = WarcReader(sys.argv[1], glob_pattern="*.warc.gz")
    extractor = Trafilatura(favour_precision=True, timeout=10.0)
    docs = sum(1 for _ in extractor.run(reader.run(None, rank=0, world_size=1), rank=0, world_size=1))
    print(json.dumps({"docs": docs, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
