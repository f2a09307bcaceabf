"""The language codes a config may use: the labels of the language-ID model (fastText lid.176).

Kept here as data, so a config is checked without loading the model; a test compares this list
with the labels of the bundled model. `check_language` turns a code the model never outputs (a
rule that could never run, a language that could never be kept) into a ConfigError that names
the key and the nearest labels.
"""

from __future__ import annotations

import difflib

from pipeline.errors import ConfigError

LID176_LABELS = frozenset(
    """af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb
    co cs cv cy da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he
    hi hif hr hsb ht hu hy ia id ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez
    li lmo lo lrc lt lv mai mg mhr min mk ml mn mr mrj ms mt mwl my myv mzn nah nap nds ne new nl
    nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa sah sc scn sco sd sh si sk sl so
    sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa war wuu xal xmf yi
    yo yue zh""".split()  # noqa: SIM905 - a table, kept compact
)
"""The 176 labels of lid.176 (ISO 639-1 where one exists, else 639-2/3 or a Wikipedia code)."""

FOLDED = {
    "ltg": "lv",  # Latgalian
    "cmn": "zh",
    "zho": "zh",
    "nb": "no",
    "fil": "tl",
    "iw": "he",
    "in": "id",
    "ji": "yi",
    "eng": "en",
}
"""Codes lid.176 has no label for, and the label it gives such text (named in the error)."""


def nearest_labels(code: str, n: int = 3) -> list[str]:
    """Up to `n` lid.176 labels closest to `code` (the folded label first, when there is one)."""
    near = difflib.get_close_matches(code.lower(), sorted(LID176_LABELS), n=n, cutoff=0.5)
    folded = FOLDED.get(code.lower())
    return [folded, *[c for c in near if c != folded]][:n] if folded else near


def check_language(key: str, code: str) -> None:
    """ConfigError at `key` unless `code` is a lid.176 label."""
    if code in LID176_LABELS:
        return
    hint = ""
    if code.lower() in FOLDED:
        hint = f"; lid.176 labels that language {FOLDED[code.lower()]!r}"
    near = nearest_labels(code)
    raise ConfigError(
        key,
        f"{code!r} is not a label of the language-ID model lid.176, so it could never match{hint}; "
        f"nearest labels: {', '.join(near) if near else '(none close)'}",
    )
