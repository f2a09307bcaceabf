"""Word splitting that follows the rules of spaCy's English tokenizer, without spaCy.

The Gopher and C4 numbers (words per document, share of alphabetic words, repeated n-grams,
sentences per line) were defined on spaCy tokens in datatrove's reference filters, so our filters
split words the same way: whitespace first, then per chunk (in this order) a whole-chunk
exception (abbreviations such as `Mr.`, URLs and e-mail addresses), prefixes peeled off the front
(opening punctuation, quotes, currency), suffixes peeled off the back (closing punctuation,
`'s`, a period after a lower-case letter, a digit or two capitals), contractions (`do|n't`,
`I|'m`) and infixes split inside (a hyphen or slash between letters, `...`). Chunks made only of
letters or digits (most of them) skip all of that. Known gaps: spaCy's emoticon list and its
full exception table; bench/filters.py measures what that costs in agreement.
"""

from __future__ import annotations

import re

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


def split_words(text: str) -> list[str]:
    """spaCy-style English tokens of `text` (no empty or whitespace tokens)."""
    out: list[str] = []
    for chunk in text.split():
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
    return out


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
