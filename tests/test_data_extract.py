"""Wikitext to plain text (pipeline/data/extract.py): literals first, then the real dumps."""

from __future__ import annotations

import re

import pytest
from helpers import assert_accounting

from pipeline.data.document import Document
from pipeline.data.extract import WikitextExtractor, markup_leak_lines, wikitext_to_text
from pipeline.data.filters import normalize_text
from pipeline.data.readers import WikipediaReader

LEAKS = [
    "{{",
    "}}",
    "{|",
    "|}",
    "|-",
    "thumb|",
    "[[",
    "<ref",
    "</ref",
    "[[Category:",
    "Category:",
    "File:",
    "'''",
    "''",
    "&nbsp;",
    "__NOTOC__",
    "<gallery",
    "<math",
]


EMPTY_PAIR = re.compile(r"\(\s*[,;]?\s*\)|（\s*[，、；]?\s*）|\(\s*[,;]\s*[,;]")


def clean(wikitext: str, site: dict | None = None) -> str:
    doc = Document("t/1", wikitext, "wikipedia")
    out = WikitextExtractor(site).process_one(doc)
    assert doc.text == wikitext  # stages return a new document, the input is left alone
    return normalize_text(out.text)


@pytest.mark.parametrize(
    ("wikitext", "expected"),
    [
        ("{{Infobox person|name=X|born=1900}}'''Ada''' was ''here''.", "Ada was here."),
        ("See [[Paris|the capital]] and [[Lyon]].", "See the capital and Lyon."),
        ("A[[File:X.jpg|thumb|upright|A caption with [[a link]]]] B", "A B"),
        ("A [[Image:y.png|200px]] [[Category:Cities]] [[de:Paris]] [[zh-yue:巴黎]] B", "A B"),
        (
            "Visible [[:Category:Cities|category link]] and [[:fr:Paris|Paris]].",
            "Visible category link and Paris.",
        ),
        ("Fact.<ref name=a>Cite {{cite web|url=x}}</ref> More.<ref name=a/>", "Fact. More."),
        ('Before\n{| class="wikitable"\n! A !! B\n|-\n| 1 || 2\n|}\nAfter', "Before\n\nAfter"),
        ("x<gallery>\nFile:A.jpg|cap\n</gallery> y <math>x^{2}</math> z", "x y z"),
        (
            "Intro\n== History ==\nText <!-- hidden --> here &amp; there&nbsp;ok",
            "Intro\n\nHistory\n\nText here & there ok",
        ),
        ("__NOTOC__\n* one\n# two\n[http://x.org a site] [http://y.org]", "one\ntwo\na site"),
        ("[[WP:NPOV|neutral point of view]] stays", "neutral point of view stays"),
        # an unbalanced '' in an infobox parameter once let the whole infobox through as text
        (
            "{{Infobox country\n| name = ''Sverige\n| capital = [[Stockholm]]\n| pop = {{formatnum:1}}\n}}\n"
            "'''Sweden''' ({{lang-sv|Sverige}}, {{IPA|[ˈsvæ̌rjɛ]}}, tiếng Anh: Sweden) is a ''country''.",
            "Sweden (tiếng Anh: Sweden) is a country.",
        ),
        ("Albedo ({{IPA|x}}) or reflection ({{lang|a}}; {{lang|b}})", "Albedo or reflection"),
        ("哲學（{{lang-en|Philosophy}}）是研究（{{a}}、{{b}}、普遍）的學科", "哲學是研究（普遍）的學科"),
        ("A {{outer|{{inner|{{deep}}}}|x}} B", "A B"),
        ("Text {{unclosed\n| key = v\n| other = w\nMore text.", "Text\nMore text."),
        ("a }} b [Test volūda|label]] c", "a b label c"),
    ],
)
def test_wikitext_to_text(wikitext, expected):
    assert clean(wikitext) == expected


def test_local_namespace_names_from_siteinfo():
    site = {"namespaces": {6: "Fails", 14: "Kategoreja", -2: "Medeja"}}
    assert clean("A [[Fails:x.jpg|thumb|c]] [[Kategoreja:Y]] B", site) == "A B"
    # an alias the siteinfo does not list (lv "Attēls:") is still known by the media file name
    assert clean("A [[Attēls:MountainLion.jpg|thumb|250px|]] B") == "A B"


def test_unparsed_markup_is_removed():
    """Markup mwparserfromhell leaves as text (a caption across lines, unbalanced quotes) still goes."""
    text = wikitext_to_text(
        "[[File:S.svg|thumb|Tree:\n Pepe vio [[a]] Pablo]]\nPhilosophy''. [[Plain link]] x"
    )
    assert normalize_text(text) == "Philosophy. Plain link x"


@pytest.mark.parametrize(
    "name",
    [
        "enwiki-pages-articles1-p10p30302-shortened.xml.bz2",
        "enwiki-table-markup.xml.bz2",
        "ltgwiki-pages-articles.xml.bz2",
        "zhwiki-test-pages.xml",
    ],
)
def test_real_dumps_have_no_leftover_markup(raw_samples, name):
    reader = WikipediaReader(raw_samples / "wiki" / name)
    docs = list(reader)
    n_in = len(docs)
    out, counts = WikitextExtractor(reader.site).process(docs)
    assert_accounting(n_in, out, counts)
    assert counts.errors == {}
    assert counts.noted.get("markup_leak_lines", 0) == 0
    assert not [m for d in out for m in EMPTY_PAIR.findall(d.text)]  # what removed templates leave
    for leak in LEAKS:
        hits = [d.id for d in out if leak in d.text]
        assert not hits, f"{leak!r} left in {hits[:5]}"
    assert sum(len(d.text) for d in out) > 0.2 * sum(len(d.text) for d in docs)  # the prose survived


def test_markup_leak_lines_counts_markup_lines():
    text = "fine line\n{{Infobox\n| name = X\n[[link]] here\nprose with a | pipe = sign\n}}"
    assert markup_leak_lines(text) == 4  # the prose pipe is not at the line start
