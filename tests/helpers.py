"""Assertions shared by test files (import as `from helpers import ...`; tests/ is on sys.path)."""

from __future__ import annotations

from pipeline.data.document import Counts


def assert_accounting(n_in, out_docs, counts) -> None:
    """DESIGN invariant 1: documents in = kept + dropped (per reason) + errors, and kept = len(out).

    `n_in` is a number or the input list; `counts` is a Counts or its `to_dict()` form (stats.json).
    """
    n_in = n_in if isinstance(n_in, int) else len(n_in)
    if isinstance(counts, dict):
        counts = Counts.from_dict(counts)
    assert counts.kept == len(out_docs), f"kept {counts.kept} but {len(out_docs)} documents came out"
    assert counts.total_in == n_in, (
        f"{n_in} in, but kept {counts.kept} + dropped {counts.dropped} + errors {counts.errors} = {counts.total_in}"
    )


def make_dump(pages: list[tuple[str, int, int, str]], dbname: str | None = "testwiki") -> str:
    """A MediaWiki export 0.10 document with (title, ns, id, wikitext) pages; no <siteinfo> if dbname is None."""
    head = (
        (
            f"<siteinfo><sitename>T</sitename><dbname>{dbname}</dbname>"
            "<base>https://test.invalid/wiki/Main_Page</base></siteinfo>"
        )
        if dbname
        else ""
    )
    body = "".join(
        f"<page><title>{t}</title><ns>{ns}</ns><id>{i}</id><revision><id>{i}0</id>"
        f"<timestamp>2020-01-0{i % 9 + 1}T00:00:00Z</timestamp><text>{text}</text></revision></page>\n"
        for t, ns, i, text in pages
    )
    return f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" xml:lang="en">{head}\n{body}</mediawiki>\n'


ARTICLES = [(f"Article {i}", 0, i, f"Text of article {i}. " * 20) for i in range(1, 6)]
