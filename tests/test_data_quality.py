"""Quality filters (pipeline/data/quality.py, langid.py, pii.py, filters.build_quality): each rule's
reason on literal documents, shared features, scores in meta, and language ID offline."""

from __future__ import annotations

import socket

import pytest
from helpers import assert_accounting

from pipeline.data import features, quality
from pipeline.data.config import (
    C4Config,
    FiltersConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LangIdConfig,
    PiiConfig,
)
from pipeline.data.document import Document
from pipeline.data.features import Features
from pipeline.data.filters import build_quality
from pipeline.data.quality import C4Quality, FineWebQuality, GopherQuality, GopherRepetition
from pipeline.data.words import split_words

GOOD = (
    "The river runs through the old town and past the mill. It has been there for centuries, and the people "
    "of the valley depend on it for water and power. Fishermen come to the banks in the early morning. "
    "Children swim in the shallow parts during the summer, and in winter the ice is thick enough to walk on. "
    "The mill was rebuilt twice after floods, and today it is a museum that tells the story of the town.\n"
    "Visitors can see the old wheel turning with the water of the river. Guides explain how grain was "
    "ground into flour and carried to the market on the other side of the hill. The museum is open every "
    "day except Monday, and entry is free for children under twelve."
)


def doc(text: str, source: str = "web", language: str = "en") -> Document:
    return Document("t/1", text, source, {"language": language})


def verdict(stage, text: str) -> str:
    out = stage.process_one(doc(text))
    return out if isinstance(out, str) else "kept"


def test_split_words_follows_spacy_conventions():
    assert split_words("It's a well-known fact (U.S.A.) that J. Smith don't pay $3.50...") == [
        "It", "'s", "a", "well", "-", "known", "fact", "(", "U.S.A.", ")", "that", "J.", "Smith", "do", "n't",
        "pay", "$", "3.50", "...",
    ]  # fmt: skip
    assert split_words("see http://x.org/a?b=1, d'autres 2019-07-17 2nd") == [
        "see", "http://x.org/a?b=1", ",", "d'autres", "2019", "-", "07", "-", "17", "2nd",
    ]  # fmt: skip


def test_good_text_passes_every_rule():
    for stage in build_quality(_all_on()):
        assert not isinstance(stage.process_one(doc(GOOD)), str), stage.name


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("the cat and the dog", "gopher_short_doc"),
        ("# " * 40 + GOOD, "gopher_hash_ratio"),
        ("... " * 60 + GOOD, "gopher_ellipsis_ratio"),
        ("\n".join(f"- item {i} of the list and more" for i in range(80)), "gopher_bullet_lines"),
        (" ".join(["1234 5678 9012 3456 7890"] * 40) + " the and of with", "gopher_alpha_words"),
        (" ".join(["river valley museum flour"] * 30), "gopher_stop_words"),
        (" ".join(["a b c d e f g h i j"] * 10) + " the and", "gopher_short_words"),
    ],
)
def test_gopher_quality_reasons(text, reason):
    assert verdict(GopherQuality(GopherQualityConfig().languages), text) == reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("\n\n".join(["The same paragraph again."] * 5 + [GOOD]), "gopher_dup_para_frac"),
        (
            "\n".join(["Same line here.", "Other line.", "Same line here.", "Same line here."]),
            "gopher_dup_line_frac",
        ),
        (GOOD + " " + " ".join(["the mill the mill"] * 60), "gopher_top_2_gram"),
        (GOOD + " " + " ".join([" ".join(f"w{i}" for i in range(40))] * 4), "gopher_dup_5_gram"),
    ],
)
def test_gopher_repetition_reasons(text, reason):
    assert verdict(GopherRepetition(GopherRepetitionConfig().languages), text) == reason


def test_repeated_ngram_chars_jumps_over_a_repeat():
    feats = Features("a b c a b c a b")
    # 2-grams from i=0: ab bc ca, then ab (i=3, repeat: +2 chars, jump to i=5), ca (repeat, +2), end
    assert feats.repeated_ngram_chars(2) == 4
    assert feats.repeated_ngram_chars(5) == 5  # a b c a b again at i=3
    assert feats.repeated_ngram_chars(6) == 0 and feats.top_ngram_chars(3) == 5 * 2  # "a b c" twice


def test_c4_uses_the_paper_numbers_and_rewrites_the_text():
    c4 = C4Quality(C4Config().languages)
    assert c4.languages["en"].min_words_per_line == 5 and c4.languages["en"].min_sentences == 3
    text = "Short line.\nThis line has enough words to stay.\nNo end mark on this line at all\n" + GOOD
    out = c4.process_one(doc(text))
    assert not isinstance(out, str)
    assert out.text.startswith("This line has enough words to stay.\nThe river")
    assert (
        verdict(c4, "One sentence with five words.\nAnother sentence with five words.")
        == "c4_too_few_sentences"
    )
    assert verdict(c4, GOOD + "\nThis page uses {curly} brackets, which C4 drops.") == "c4_curly_bracket"
    assert verdict(c4, GOOD + "\nLorem ipsum dolor sit amet, consectetur.") == "c4_lorem_ipsum"
    cleaned = c4.process_one(
        doc(GOOD + "\nPlease enable JavaScript in your browser now.\nRead our privacy policy here today.")
    )
    assert "JavaScript" not in cleaned.text and "privacy" not in cleaned.text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("\n".join(["no end mark on this line here"] * 10), "fineweb_line_punct_ratio"),
        (
            "\n".join(["Short one."] * 3 + [f"Tiny {i}." for i in range(10)] + [GOOD]),
            "fineweb_short_line_ratio",
        ),
        (GOOD + "\n" + GOOD.split("\n")[1], "fineweb_char_dup_ratio"),
        ("\n".join(f"Item {i} here." for i in range(40)) + "\n" + "ok " * 10, "fineweb_short_line_ratio"),
    ],
)
def test_fineweb_reasons(text, reason):
    assert verdict(FineWebQuality(FineWebConfig().languages), text) == reason


def test_features_are_computed_once_per_text(monkeypatch):
    calls = []
    real = features.split_words
    for module in (features, quality):
        monkeypatch.setattr(module, "split_words", lambda t, lang=None: calls.append(t) or real(t, lang))
    docs = [doc(GOOD + "\nA line with a citation.[1] It ends here.")]
    names = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
    for stage in [s for s in build_quality(_all_on()) if s.name in names]:
        docs, _ = stage.process(docs)
    assert len(docs) == 1
    # one split per line, once for the whole chain; only the line C4 changed is split again
    assert calls == [
        *GOOD.split("\n"),
        "A line with a citation.[1] It ends here.",
        "A line with a citation. It ends here.",
    ]


def test_scores_skip_sources_and_accounting():
    cfg = _all_on()
    cfg.langid.enabled, cfg.pii.enabled = False, False
    cfg.skip_sources, cfg.write_scores = ["wikipedia"], True
    docs = [doc(GOOD), doc("the cat", source="wikipedia"), doc("too short for the web rules")]
    for stage in build_quality(cfg):
        before = docs
        docs, counts = stage.process(docs)
        assert_accounting(before, docs, counts)
    assert [d.source for d in docs] == ["web", "wikipedia"]
    assert {"words", "alpha_words", "line_punct_ratio", "c4_sentences"} <= set(docs[0].meta["scores"])
    assert "scores" not in docs[1].meta


def test_langid_keeps_configured_languages_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("language ID tried to open a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    from pipeline.data.langid import LangIdFilter

    stage = LangIdFilter(LangIdConfig(enabled=True, languages=["en", "de"], per_language={"de": 0.99}), True)
    docs = [
        doc(GOOD),
        doc("Der Fluss fließt durch die alte Stadt und an der Mühle vorbei. Die Leute im Tal brauchen ihn."),
        doc("La rivière traverse la vieille ville et passe devant le moulin depuis des siècles."),
        doc("   "),
    ]
    out, counts = stage.process(docs)
    assert_accounting(docs, out, counts)
    assert out[0].meta["language"] == "en" and out[0].meta["scores"]["language_score"] > 0.65
    assert counts.dropped["wrong_language"] == 2  # French, and the blank text


def test_pii_replaces_emails_and_public_ips_only():
    from pipeline.data.pii import PiiRedactor

    text = "Mail jane.doe+x@mail.example.org or 8.8.8.8; the router is 192.168.1.1, version 1.2.3.4.5."
    out = PiiRedactor(PiiConfig(enabled=True)).process_one(doc(text))
    assert out.text == "Mail email@example.com or 0.0.0.0; the router is 192.168.1.1, version 1.2.3.4.5."
    assert out.meta["pii"] == {"email": 1, "ip": 1}
    clean = doc("nothing to see here")
    assert PiiRedactor(PiiConfig(enabled=True)).process_one(clean) is clean


def test_chain_order_follows_fineweb():
    names = [s.name for s in build_quality(_all_on())]
    assert names == ["langid", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii"]
    assert build_quality(FiltersConfig()) == []


def _all_on() -> FiltersConfig:
    cfg = FiltersConfig()
    for section in (cfg.langid, cfg.gopher_repetition, cfg.gopher_quality, cfg.c4, cfg.fineweb, cfg.pii):
        section.enabled = True
    return cfg
