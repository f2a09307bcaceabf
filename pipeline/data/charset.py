"""Bytes of a web page to text, the way a browser picks the encoding, plus a fallback browsers lack.

Order (the WHATWG Encoding Standard and HTML's encoding sniffing): a byte-order mark, then the HTTP
`charset`, then a `<meta charset>` / `<meta http-equiv>` in the page's first bytes, then detection
(uchardet through Resiliparse). Every label goes through the Encoding Standard's label table, so
`gb2312` decodes as GBK (with the GB18030 decoder, as the standard does), `iso-8859-1`/`latin1`/
`ascii` as windows-1252, `x-sjis` as Shift_JIS (Windows-31J, Python's `cp932`) and `ks_c_5601-1987`
as EUC-KR (Windows-949, `cp949`).

Three departures from a browser, because a training corpus wants the text, not the mojibake:
- a page declared in a legacy encoding whose bytes are valid UTF-8 with at least one multi-byte
  character is read as UTF-8 (legacy text is practically never valid UTF-8 by accident);
- a windows-1252 label (what `iso-8859-1`, HTTP/1.1's old default, maps to) on a page whose text is
  mostly bytes >= 0x80 (so not a Latin-script language) yields to the `<meta>` label or detection:
  a windows-1251 page served as latin-1 reads as Russian;
- when the declared encoding leaves more U+FFFD than it decodes non-ASCII characters (a
  windows-1252 page served as UTF-8, a GBK page served as Shift_JIS), the other candidates (the
  `<meta>` label, detection) are tried and the one with the fewest replacements wins.
Replacements (U+FFFD the decoder had to insert, not ones the page itself contains) are counted
per document so a later stage or a user can filter on them.
"""

from __future__ import annotations

import codecs
import encodings.cp1252
import re
from dataclasses import dataclass

# The Encoding Standard's encodings and their labels (https://encoding.spec.whatwg.org/#names-and-labels),
# each with the Python codec that decodes it. Labels are matched lower-case, ASCII whitespace trimmed.
_ENCODINGS: dict[str, tuple[str, str]] = {
    "utf-8": ("utf-8", "unicode-1-1-utf-8 unicode11utf8 unicode20utf8 utf-8 utf8 x-unicode20utf8"),
    "ibm866": ("cp866", "866 cp866 csibm866 ibm866"),
    "iso-8859-2": (
        "iso8859_2",
        "csisolatin2 iso-8859-2 iso-ir-101 iso8859-2 iso88592 iso_8859-2 iso_8859-2:1987 l2 latin2",
    ),
    "iso-8859-3": (
        "iso8859_3",
        "csisolatin3 iso-8859-3 iso-ir-109 iso8859-3 iso88593 iso_8859-3 iso_8859-3:1988 l3 latin3",
    ),
    "iso-8859-4": (
        "iso8859_4",
        "csisolatin4 iso-8859-4 iso-ir-110 iso8859-4 iso88594 iso_8859-4 iso_8859-4:1988 l4 latin4",
    ),
    "iso-8859-5": (
        "iso8859_5",
        "csisolatincyrillic cyrillic iso-8859-5 iso-ir-144 iso8859-5 iso88595 iso_8859-5 iso_8859-5:1988",
    ),
    "iso-8859-6": (
        "iso8859_6",
        "arabic asmo-708 csiso88596e csiso88596i csisolatinarabic ecma-114 iso-8859-6 iso-8859-6-e "
        "iso-8859-6-i iso-ir-127 iso8859-6 iso88596 iso_8859-6 iso_8859-6:1987",
    ),
    "iso-8859-7": (
        "iso8859_7",
        "csisolatingreek ecma-118 elot_928 greek greek8 iso-8859-7 iso-ir-126 iso8859-7 iso88597 "
        "iso_8859-7 iso_8859-7:1987 sun_eu_greek",
    ),
    "iso-8859-8": (
        "iso8859_8",
        "csiso88598e csisolatinhebrew hebrew iso-8859-8 iso-8859-8-e iso-ir-138 iso8859-8 iso88598 "
        "iso_8859-8 iso_8859-8:1988 visual",
    ),
    "iso-8859-8-i": ("iso8859_8", "csiso88598i iso-8859-8-i logical"),
    "iso-8859-10": ("iso8859_10", "csisolatin6 iso-8859-10 iso-ir-157 iso8859-10 iso885910 l6 latin6"),
    "iso-8859-13": ("iso8859_13", "iso-8859-13 iso8859-13 iso885913"),
    "iso-8859-14": ("iso8859_14", "iso-8859-14 iso8859-14 iso885914"),
    "iso-8859-15": ("iso8859_15", "csisolatin9 iso-8859-15 iso8859-15 iso885915 iso_8859-15 l9"),
    "iso-8859-16": ("iso8859_16", "iso-8859-16"),
    "koi8-r": ("koi8_r", "cskoi8r koi koi8 koi8-r koi8_r"),
    "koi8-u": ("koi8_u", "koi8-ru koi8-u"),
    "macintosh": ("mac_roman", "csmacintosh mac macintosh x-mac-roman"),
    "windows-874": ("cp874", "dos-874 iso-8859-11 iso8859-11 iso885911 tis-620 windows-874"),
    "windows-1250": ("cp1250", "cp1250 windows-1250 x-cp1250"),
    "windows-1251": ("cp1251", "cp1251 windows-1251 x-cp1251"),
    "windows-1252": (
        "cp1252",
        "ansi_x3.4-1968 ascii cp1252 cp819 csisolatin1 ibm819 iso-8859-1 iso-ir-100 iso8859-1 iso88591 "
        "iso_8859-1 iso_8859-1:1987 l1 latin1 us-ascii windows-1252 x-cp1252",
    ),
    "windows-1253": ("cp1253", "cp1253 windows-1253 x-cp1253"),
    "windows-1254": (
        "cp1254",
        "cp1254 csisolatin5 iso-8859-9 iso-ir-148 iso8859-9 iso88599 iso_8859-9 iso_8859-9:1989 l5 "
        "latin5 windows-1254 x-cp1254",
    ),
    "windows-1255": ("cp1255", "cp1255 windows-1255 x-cp1255"),
    "windows-1256": ("cp1256", "cp1256 windows-1256 x-cp1256"),
    "windows-1257": ("cp1257", "cp1257 windows-1257 x-cp1257"),
    "windows-1258": ("cp1258", "cp1258 windows-1258 x-cp1258"),
    "x-mac-cyrillic": ("mac_cyrillic", "x-mac-cyrillic x-mac-ukrainian"),
    # The standard's GBK decoder is its gb18030 decoder: GBK-only and 4-byte characters decode too.
    "gbk": ("gb18030", "chinese csgb2312 csiso58gb231280 gb2312 gb_2312 gb_2312-80 gbk iso-ir-58 x-gbk"),
    "gb18030": ("gb18030", "gb18030"),
    "big5": ("big5hkscs", "big5 big5-hkscs cn-big5 csbig5 x-x-big5"),  # the standard's Big5 includes HKSCS
    # euc_jis_2004 also decodes the NEC row-13 symbols (circled digits) that the standard's index has
    "euc-jp": ("euc_jis_2004", "cseucpkdfmtjapanese euc-jp x-euc-jp"),
    "iso-2022-jp": ("iso2022_jp_ext", "csiso2022jp iso-2022-jp"),
    "shift_jis": ("cp932", "csshiftjis ms932 ms_kanji shift-jis shift_jis sjis windows-31j x-sjis"),
    "euc-kr": (
        "cp949",
        "cseuckr csksc56011987 euc-kr iso-ir-149 korean ks_c_5601-1987 ks_c_5601-1989 ksc5601 ksc_5601 "
        "windows-949",
    ),
    "utf-16be": ("utf-16-be", "unicodefffe utf-16be"),
    "utf-16le": ("utf-16-le", "csunicode iso-10646-ucs-2 ucs-2 unicode unicodefeff utf-16 utf-16le"),
    # The standard's "replacement" encoding (iso-2022-kr, hz-gb-2312, ...) and x-user-defined are left
    # out on purpose: an unusable label falls through to the next source instead of one U+FFFD.
}
LABELS: dict[str, str] = {label: name for name, (_, labels) in _ENCODINGS.items() for label in labels.split()}
"""WHATWG label -> encoding name, e.g. "gb2312" -> "gbk", "latin1" -> "windows-1252"."""

_UTF16 = ("utf-16be", "utf-16le")
_CODEC_ALIASES = {  # Python codec names uchardet answers with that are not WHATWG labels
    "mac-cyrillic": "x-mac-cyrillic",
    "mac-roman": "macintosh",
    "iso2022-jp": "iso-2022-jp",
    "cp932": "shift_jis",
    "cp949": "euc-kr",
    "big5hkscs": "big5",
    "euc-jis-2004": "euc-jp",
}
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_BE, "utf-16be"), (codecs.BOM_UTF16_LE, "utf-16le"))
META_SCAN_BYTES = 8192
"""How far `<meta charset>` is looked for. Browsers prescan 1024 bytes, then switch encodings if the
parser meets a later `<meta>` in the head; 8 KiB catches those late ones without parsing."""
_MARKUP = re.compile(rb"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.IGNORECASE | re.DOTALL)
_ASCII = bytes(range(128))
_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_META = re.compile(rb"<meta\b[^>]*?\bcharset\s*=\s*[\"']?\s*([^\s\"'/>;,]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Decoded:
    """A page's text and how it was decoded."""

    text: str
    codec: str
    """The Python codec that decoded the page (`gb18030` for a page labelled gb2312)."""
    source: str
    """Where the encoding came from: bom, http, meta, utf8 (valid UTF-8 despite a legacy label), detected."""
    replacements: int
    """U+FFFD the decoder inserted for bytes the encoding does not define."""


def encoding_for_label(label: str | None) -> str | None:
    """The WHATWG encoding name for a label (None when the label is unknown or unusable)."""
    if not label:
        return None
    return LABELS.get(label.strip("\t\n\f\r \"'").lower())


def python_codec(encoding: str) -> str:
    """The Python codec for a WHATWG encoding name (a key of `_ENCODINGS`)."""
    return _ENCODINGS[encoding][0]


def meta_charset(page: bytes) -> str | None:
    """The encoding named by the first `<meta charset>` / `http-equiv` tag that names a known label."""
    for m in _META.finditer(page[:META_SCAN_BYTES]):
        enc = encoding_for_label(m.group(1).decode("ascii", "replace"))
        if enc in _UTF16:
            return "utf-8"  # the standard: ASCII-readable <meta> cannot be UTF-16, so it means UTF-8
        if enc:
            return enc
    return None


def detect_encoding(page: bytes) -> str:
    """uchardet's guess (through Resiliparse) as a WHATWG encoding name; windows-1252 if it has none."""
    from resiliparse.parse.encoding import detect_encoding as uchardet

    name = (uchardet(page, html5_compatible=False) or "").lower()  # a Python codec name: "euc_jp"
    guess = encoding_for_label(name) or encoding_for_label(_CODEC_ALIASES.get(name.replace("_", "-")))
    guess = guess or encoding_for_label(name.replace("_", "-"))
    return guess if guess and guess not in _UTF16 else "windows-1252"  # no BOM: never guess UTF-16


def decode(data: bytes, encoding: str, source: str) -> Decoded:
    """Decode with a WHATWG encoding, replacing undefined bytes and counting the replacements."""
    codec = python_codec(encoding)
    if codec == "cp1252":  # every byte defined: no replacements
        return Decoded(codecs.charmap_decode(data, "strict", _WINDOWS_1252)[0], codec, source, 0)
    try:
        return Decoded(data.decode(codec), codec, source, 0)
    except UnicodeDecodeError:
        text = data.decode(codec, errors="gristmill.replace")
        # each inserted U+FFFD is exactly one character the "ignore" decoding lacks
        return Decoded(text, codec, source, len(text) - len(data.decode(codec, errors="gristmill.ignore")))


# Bytes the standard's decoders define and Python's codecs do not: the five windows-1252 bytes Python
# leaves unassigned are the C1 controls of the same number, and GBK/gb18030 0x80 is the euro sign.
_WINDOWS_1252 = "".join(chr(b) if c == "\ufffe" else c for b, c in enumerate(encodings.cp1252.decoding_table))
_EXTRA = {"gb18030": {0x80: "\u20ac"}}


def _whatwg_errors(replacement: str):
    def handler(exc: UnicodeDecodeError) -> tuple[str, int]:
        extra = _EXTRA.get(exc.encoding, {}).get(exc.object[exc.start])
        return (extra, exc.start + 1) if extra else (replacement, exc.end)

    return handler


codecs.register_error("gristmill.replace", _whatwg_errors("\ufffd"))
codecs.register_error("gristmill.ignore", _whatwg_errors(""))


def decode_html(page: bytes, http_charset: str | None = None) -> Decoded:
    """The page's text: BOM, HTTP charset, `<meta>`, detection; a declared encoding that does not fit
    the bytes loses to the candidate with the fewest replacements (see the module docstring)."""
    for bom, enc in _BOMS:
        if page.startswith(bom):
            return decode(page[len(bom) :], enc, "bom")
    declared = [(encoding_for_label(http_charset), "http"), (meta_charset(page), "meta")]
    declared = [(enc, src) for enc, src in declared if enc]
    if not declared:
        return _best([(None, "detected")], page)
    first = declared[0][0]
    if first not in ("utf-8", *_UTF16) and not page.isascii():
        try:
            return Decoded(page.decode("utf-8"), "utf-8", "utf8", 0)
        except UnicodeDecodeError:
            pass  # not UTF-8: the label stands
    candidates = [*declared, (None, "detected")]  # None: detect only if needed (uchardet costs)
    if first == "windows-1252" and _mostly_high_bytes(page):
        # iso-8859-1 is HTTP/1.1's old default and what many servers send for any page; text that is
        # mostly bytes >= 0x80 is not a Latin-script language: let the <meta> or detection speak first
        candidates = [c for c in candidates if c[0] != first] + candidates[:1]
    return _best(candidates, page)


def _best(candidates: list[tuple[str | None, str]], page: bytes) -> Decoded:
    """The first candidate unless its replacements outnumber the non-ASCII characters it decoded;
    then whichever candidate leaves the fewest replacements (the earlier one on a tie).
    A candidate without an encoding stands for detection."""
    tried: set[str] = set()
    best = None
    for enc, src in candidates:
        enc = enc or detect_encoding(page)
        if enc in tried:
            continue
        tried.add(enc)
        out = decode(page, enc, src)
        if best is None or out.replacements < best.replacements:
            best = out
        if best.replacements == 0 or best.replacements <= _non_ascii(best.text) - best.replacements:
            return best
    return best


def _mostly_high_bytes(page: bytes) -> bool:
    """More bytes >= 0x80 than ASCII letters in the page's text (tags, scripts and styles removed)."""
    text = _MARKUP.sub(b" ", page[: 1 << 16])
    return len(text.translate(None, _ASCII)) > len(text) - len(text.translate(None, _LETTERS))


def _non_ascii(text: str) -> int:
    return len(text) - len(text.encode("ascii", errors="ignore"))
