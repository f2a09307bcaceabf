"""Language-independent units for n-gram matching (decontamination) and for the learned quality
classifier, built on pipeline/data/words.py's splitting.

Both uses compare a text with text from elsewhere: an evaluation set with a training document, a
classifier's training texts with the documents it scores. So the units must not depend on the
document's language label or on the words around a passage: `words.split_words` without a
language (spaCy-style words for spaced scripts, one unit per character, combining marks kept,
for scripts written without spaces), never a dictionary segmenter. Measured on the Alpaca-zh
answers: jieba splits 0.36 M characters/s against 3.7 M for characters, and a passage pasted
into another text was segmented differently at its edges in 41 of 300 cases (its inner words
never), which would lose the n-grams at the edges of a copied benchmark item. A window of 13
Chinese characters is about 8 jieba words.
"""

from __future__ import annotations

import unicodedata

from pipeline.data.features import PUNCT
from pipeline.data.words import UNSPACED_RUN, characters, split_words


def normalize(text: str) -> str:
    """NFKC and case folding: full-width Latin, ligatures and case never make a text new."""
    return unicodedata.normalize("NFKC", text).casefold()


def word_units(text: str) -> list[str]:
    """The units n-grams are made of: words and unspaced-script characters of the normalized text,
    punctuation-only tokens dropped."""
    return [w for w in split_words(normalize(text)) if w.isalnum() or not PUNCT.issuperset(w)]


def _set_apart(match) -> str:
    return " " + " ".join(characters(match.group())) + " "


def spaced(text: str) -> str:
    """The classifier's input: lower case, one line, each character of an unspaced script set apart so
    that fastText (which splits on whitespace) sees it as a word; its word bigrams then cover the
    two-character words most Chinese words are. Cheaper than `word_units`: no NFKC, punctuation
    stays on its word, as in fastText's own preprocessing."""
    text = text.lower().replace("\n", " ")  # fastText reads up to "\n"; other whitespace splits words
    if UNSPACED_RUN.search(text):  # one match per run, set apart by a C-level join
        text = UNSPACED_RUN.sub(_set_apart, text)
    return text
