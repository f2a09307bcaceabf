"""Helper of bench/filters.py, run by the interpreter that has datatrove (a separate venv, because
datatrove's fasttext and trafilatura pins clash with ours): the Gopher+C4+FineWeb chain on the
documents in argv[1] (JSON lines of {"id", "text"}); writes [{"id", "kept", "reason", "text"}] +
CPU seconds to argv[2]. Settings match bench/filters.py's: C4 with the paper's numbers and FineWeb's
terminal-punctuation setting."""

import json
import sys
import time

from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    chain = [
        ("gopher_repetition", GopherRepetitionFilter()),
        ("gopher_quality", GopherQualityFilter()),
        ("c4", C4QualityFilter(filter_no_terminal_punct=False, min_words_per_line=5, min_num_sentences=3)),
        ("fineweb", FineWebQualityFilter()),
    ]
    chain[0][1].filter(Document(text="warm up the spaCy tokenizer.", id="w"))
    out = []
    start = time.process_time()
    for d in docs:
        doc = Document(text=d["text"], id=d["id"])
        verdict = {"id": d["id"], "kept": True, "reason": None}
        for name, f in chain:
            res = f.filter(doc)
            if res is not True:
                verdict = {
                    "id": d["id"],
                    "kept": False,
                    "reason": f"{name}:{res[1] if isinstance(res, tuple) else ''}",
                }
                break
        verdict["text"] = doc.text if verdict["kept"] else None
        out.append(verdict)
    seconds = time.process_time() - start
    with open(sys.argv[2], "w", encoding="utf-8") as fh:
        json.dump({"seconds": seconds, "verdicts": out}, fh)


if __name__ == "__main__":
    main()
