"""Word splitting per language: segmenters for languages written without spaces, and otherwise
rules that follow spaCy's English tokenizer, without spaCy.

The Gopher and C4 numbers (words per document, share of alphabetic words, repeated n-grams,
sentences per line) were defined on spaCy tokens in datatrove's reference filters, so our filters
split spaced text the same way: whitespace first, then per chunk (in this order) a whole-chunk
exception (abbreviations such as `Mr.`, URLs and e-mail addresses), prefixes peeled off the front
(opening punctuation, quotes, currency), suffixes peeled off the back (closing punctuation,
`'s`, a period after a lower-case letter, a digit or two capitals), contractions (`do|n't`,
`I|'m`) and infixes split inside (a hyphen or slash between letters, `...`). Chunks made only of
letters or digits (most of them) skip all of that. Known gaps: spaCy's emoticon list and its
full exception table; bench/filters.py measures what that costs in agreement.

Languages written without spaces get a segmenter instead (`split_words(text, language)`): jieba
for Chinese (zh, and wuu/yue, which lid.176 labels apart), TinySegmenter for Japanese and
PyThaiNLP's newmm for Thai; all three are pure Python and offline (their dictionaries or models
ship in the wheel). Korean separates words with spaces and uses the rules above. Other text in a
script written without spaces (Lao, Khmer, Burmese, Tibetan, Chinese quoted in an English page),
and those three languages when their package is missing, falls back to one word per character: a
stated approximation (a Chinese word averages about 1.5 characters), never one page-long "word".
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable
from functools import cache

log = logging.getLogger(__name__)

_PUNCT = r",:;!?¿؟¡()\[\]{}<>_#*&。？！，、；：～·।،۔؛٪"
_QUOTES = r"'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉⟦⟧"
_CURRENCY = r"$£€¥฿₽₴₠-₿"
_LOWER = r"a-zß-öø-ÿ"
_UPPER = r"A-ZÀ-ÖØ-Þ"
_PREFIX = re.compile(
    rf"^(?:''|[§%=—–°]|\+(?![0-9])|\.\.+|…|[{_PUNCT}]|[{_QUOTES}]|US\$|C\$|A\$|[{_CURRENCY}])"
)
_SUFFIX = re.compile(
    rf"(?:\):|''|\.\.+|…|[{_PUNCT}]|[{_QUOTES}]|['’][sS]|[—–°®©™]|(?<=[0-9])\+|(?<=[0-9])[{_CURRENCY}]"
    r"|(?<=[0-9])(?:%|km[²³]?|m[²³]?|dm[²³]?|cm[²³]?|mm[²³]?|ha|µm|nm|yd|in|ft|kg|g|mg|µg|t|lb|oz|m/s|km/h|kmh"
    r"|mph|hPa|Pa|mbar|mb|MB|kb|KB|gb|GB|tb|TB|T|G|M|K)"
    rf"|(?<=[0-9%²\-+{_PUNCT}{_QUOTES}])\.)$"
)
_INFIX = re.compile(
    rf"\.\.+|…|[°®©™]|(?<=[0-9])[+\-*^](?=[0-9-])|(?<=[{_LOWER}{_QUOTES}])\.(?=[{_UPPER}{_QUOTES}])"
    r"|(?<=[^\W\d_]),(?=[^\W\d_])|(?<=[^\W_])(?:---|--|——|-|–|—|~)(?=[^\W\d_])"
    r"|(?<=[^\W_])[:<>=/](?=[^\W\d_])"
)
_CONTRACTION = re.compile(r"^(.+?)(n['’]t|['’](?:m|re|ve|ll|d|s))$", re.I)
_URL = re.compile(
    r"^(?:(?:[a-z][a-z0-9+.-]*://|www\.)\S*[^\s.,;:!?)\]}'\"]|[\w.+-]+@[\w-]+(?:\.[\w-]+)+)$", re.I
)
_ABBREVIATIONS = frozenset(
    [
        "Mr.",
        "Mrs.",
        "Ms.",
        "Dr.",
        "St.",
        "Jr.",
        "Co.",
        "Corp.",
        "Inc.",
        "Ltd.",
        "vs.",
        "e.g.",
        "i.e.",
        "and/or",
        "a.m.",
        "p.m.",
        "Mt.",
        "Gen.",
        "Gov.",
        "Sen.",
        "Rep.",
        "Rev.",
        "Jan.",
        "Feb.",
        "Mar.",
        "Apr.",
        "Jun.",
        "Jul.",
        "Aug.",
        "Sep.",
        "Sept.",
        "Oct.",
        "Nov.",
        "Dec.",
        "Ph.D.",
        "U.S.",
        "U.K.",
        ":)",
        ":(",
        ":-)",
        ";)",
        ":D",
        ":P",
        "<3",
    ]
    + [f"{c}." for c in "abcdefghijklmnopqrstuvwxyz"]
)


_NT = "do does did is are was were have has had would could should must need might"
_SPECIAL = {
    **{w + "nt": [w, "nt"] for w in _NT.split()},
    "cant": ["ca", "nt"],
    "wont": ["wo", "nt"],
    "aint": ["ai", "nt"],
    "im": ["i", "m"],
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "gotta": ["got", "ta"],
}
_SPECIAL.update({k.capitalize(): [v[0].capitalize(), *v[1:]] for k, v in list(_SPECIAL.items())})
"""Whole words spaCy splits although they hold only letters (its exception table)."""


_EASY_SUFFIX = frozenset(",;:!?)]}.")


# Scripts written without spaces between words: Thai, Lao, Tibetan, Myanmar, Khmer, kana, CJK
# ideographs (extension A, the main block, compatibility forms, planes 2-3), halfwidth katakana.
UNSPACED_RUN = re.compile(
    "([\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f]+)"
)
"""A run of characters of scripts written without spaces (one capture group, for `re.split`)."""


def split_words(text: str, language: str | None = None) -> list[str]:
    """Words of `text` (no empty or whitespace tokens): `language`'s segmenter when SEGMENTERS
    has one, otherwise spaCy-style rules on whitespace-separated chunks."""
    segment = _segmenter(language) if language in SEGMENTERS else None
    if segment is not None:
        return [w for w in segment(text) if w and not w.isspace()]
    out: list[str] = []
    for chunk in text.split():
        if chunk.isascii() or not UNSPACED_RUN.search(chunk):
            _split_spaced(chunk, out)
            continue
        for i, piece in enumerate(UNSPACED_RUN.split(chunk)):
            if i % 2:
                out.extend(characters(piece))  # no segmenter for this run: one word per character
            elif piece:
                _split_spaced(piece, out)
    return out


def characters(run: str) -> list[str]:
    """One word per character, combining marks (Thai/Lao tone marks, vowel signs) kept on theirs."""
    if run.isalpha():  # no combining mark (category M is not alphabetic): Chinese and kana runs
        return list(run)
    out: list[str] = []
    for ch in run:
        if out and unicodedata.category(ch).startswith("M"):
            out[-1] += ch
        else:
            out.append(ch)
    return out


def splitter_name(language: str | None) -> str:
    """How `language`'s words are split (for the report): its segmenter, or the rule used."""
    if language in SEGMENTERS:
        return SEGMENTERS[language][0] if _segmenter(language) is not None else "characters (fallback)"
    return "whitespace+punctuation"


def _split_spaced(chunk: str, out: list[str]) -> None:
    """Append the spaCy-style tokens of one whitespace-free chunk to `out`."""
    if chunk.isalpha() or chunk.isdigit():
        out.extend(_SPECIAL.get(chunk, (chunk,)))
    elif chunk[-1] in _EASY_SUFFIX and chunk[:-1].isalpha() and chunk not in _ABBREVIATIONS:
        # the common "word," / "word." case, without the general loop
        if chunk[-1] != "." or _period_suffix(chunk):
            out.extend(_SPECIAL.get(chunk[:-1], (chunk[:-1],)))
            out.append(chunk[-1])
        else:
            out.append(chunk)  # an initial: J.
    else:
        _split_chunk(chunk, out)


def _split_chunk(chunk: str, out: list[str]) -> None:
    suffixes: list[str] = []
    while chunk and chunk not in _ABBREVIATIONS and not chunk.isalpha() and not _URL.match(chunk):
        if m := _PREFIX.search(chunk):
            out.append(m.group())
            chunk = chunk[m.end() :]
        elif (m := _SUFFIX.search(chunk)) and m.start() > 0:
            suffixes.append(m.group())
            chunk = chunk[: m.start()]
        elif _period_suffix(chunk):
            suffixes.append(".")
            chunk = chunk[:-1]
        else:
            break
    if chunk:
        _split_middle(chunk, out)
    out.extend(reversed(suffixes))


def _period_suffix(chunk: str) -> bool:
    """A final period after a letter that is not a capital (end., ред.), or after two capitals (USA.);
    J. and M. stay whole, as initials."""
    if len(chunk) < 2 or chunk[-1] != "." or not chunk[-2].isalpha():
        return False
    return not chunk[-2].isupper() or (len(chunk) > 2 and chunk[-3].isupper())


def _split_middle(chunk: str, out: list[str]) -> None:
    if chunk in _ABBREVIATIONS or chunk.isalnum() or _URL.match(chunk):
        out.extend(_SPECIAL.get(chunk, (chunk,)))
        return
    if m := _CONTRACTION.match(chunk):
        out.extend(g for g in m.groups() if g)
        return
    start = 0
    for m in _INFIX.finditer(chunk):
        if m.start() > start:
            out.append(chunk[start : m.start()])
        out.append(m.group())
        start = m.end()
    if start < len(chunk):
        out.append(chunk[start:])


def _jieba() -> Callable[[str], list[str]]:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading lines are noise
    jieba.initialize()
    return jieba.lcut


def _tinysegmenter() -> Callable[[str], list[str]]:
    import tinysegmenter

    return tinysegmenter.TinySegmenter().tokenize


def _pythainlp() -> Callable[[str], list[str]]:
    from pythainlp.tokenize import word_tokenize

    return lambda text: word_tokenize(text, engine="newmm", keep_whitespace=False)


SEGMENTERS: dict[str, tuple[str, Callable[[], Callable[[str], list[str]]]]] = {
    "zh": ("jieba", _jieba),
    "wuu": ("jieba", _jieba),
    "yue": ("jieba", _jieba),
    "ja": ("tinysegmenter", _tinysegmenter),
    "th": ("pythainlp-newmm", _pythainlp),
}
"""lid.176 label -> (name, loader of its word segmenter). Every other language splits on spaces."""


@cache
def _segmenter(language: str) -> Callable[[str], list[str]] | None:
    """`language`'s segmenter, loaded once per process; None (with a warning) when its package is missing."""
    name, load = SEGMENTERS[language]
    try:
        return load()
    except ImportError:
        log.warning("%s: %s is not installed; counting one word per character instead", language, name)
        return None
