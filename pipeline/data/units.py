"""Language-aware word units for n-gram matching (decontamination) and the learned quality classifier.

Scripts written without spaces between words (Han, Hiragana/Katakana, Bopomofo, Thai, Lao,
Khmer, Myanmar) give one unit per character, the usual unit of n-gram overlap for Chinese and
Japanese (a 13-gram of Han characters is about 8 words). Every other script gives runs of
letters, digits and combining marks (so Devanagari vowel signs and Arabic harakat stay inside
their word), which is whitespace splitting without the punctuation. Text is NFKC-normalized
and case-folded first, so full-width Latin, ligatures and case never make a text new. This is a
deterministic segmentation, not a dictionary segmenter: both sides of a comparison (an evaluation
set and a training document) are split by the same rule, which is all n-gram matching needs.
`spaced` is the classifier's cheaper variant: the same character split for unspaced scripts, case
folded by `lower()`, punctuation left on its word (as fastText's own preprocessing does).
"""

from __future__ import annotations

import re
import unicodedata

_NO_SPACE = (
    "\u2e80-\u2fdf"  # CJK radicals
    "\u3005\u3007\u3021-\u3029\u3038-\u303b"  # ideographic iteration marks and numerals
    "\u3040-\u30ff\u31f0-\u31ff"  # Hiragana, Katakana
    "\u3100-\u312f\u31a0-\u31bf"  # Bopomofo
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # Han
    "\U00020000-\U0003134f"  # Han extensions B-G
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f\u1780-\u17ff"  # Myanmar, Khmer
)
_MARKS = (  # combining marks that Python's \w leaves out but that sit inside words
    "\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed"
    "\u0900-\u0dff"  # the Indic blocks (Devanagari ... Sinhala), letters and signs alike
    "\u0f18-\u0f19\u0f35-\u0f39\u0f71-\u0f84\u1ab0-\u1aff\u1dc0-\u1dff\u200c\u200d\u20d0-\u20ff\ufe20-\ufe2f"
)
_WORD = rf"(?:[^\W_{_NO_SPACE}]|[{_MARKS}])+"
_UNITS = re.compile(rf"[{_NO_SPACE}]|{_WORD}")
_UNSPACED = re.compile(rf"[{_NO_SPACE}]+")


def normalize(text: str) -> str:
    """NFKC and case folding: the form both sides of a comparison are split from."""
    return unicodedata.normalize("NFKC", text).casefold()


def word_units(text: str) -> list[str]:
    """Words of spaced scripts and single characters of unspaced ones; punctuation dropped."""
    return _UNITS.findall(normalize(text))


def spaced(text: str) -> str:
    """Lower-cased text on one line, each character of an unspaced script set apart: the cheap form
    a fastText classifier splits into words (no NFKC and no punctuation split, to stay fast)."""
    text = text.lower().replace("\n", " ")  # fastText reads up to "\n"; other whitespace splits words
    if _UNSPACED.search(text):  # one match per run of characters, spaced by a C-level join
        text = _UNSPACED.sub(lambda m: " " + " ".join(m.group()) + " ", text)
    return text
