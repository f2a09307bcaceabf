"""Wikitext to plain text, with mwparserfromhell, as a Stage.

We render the parse tree ourselves instead of calling `strip_code()`, which leaks image options
("thumb|upright|...") and table rows (see notes/data-libs-facts.md §4). Dropped entirely:
templates (infoboxes; they are not expanded), tables, comments, `<ref>`, `<gallery>`, `<math>`
and similar tags, File/Image/Media/Category links (under their local names too) and
interlanguage links. Kept: link text, external link titles, list and paragraph text, and
section headings on lines of their own. Bold/italic quotes disappear with the markup.

The parser runs with `skip_style_tags=True`: with style parsing on, one unbalanced `''` inside a
template parameter makes it give up on the whole template, whose raw text (an infobox of
`| key = value` lines) then passes into the document. A last pass over the rendered text removes
markup the parser still left as text: `{{...}}` spans at any nesting depth (an unclosed one up to
its line end), template-parameter lines, stray `[[`/`]]`, table lines; and it tidies what removed
templates leave behind: empty brackets ("()", "（）") and separators with nothing between them
("(, , tiếng Anh: Sweden)" becomes "(tiếng Anh: Sweden)"). `markup_leak_lines` counts the lines
that still look like markup; the stage adds them to its counters (`noted["markup_leak_lines"]`)
for the report.
"""

from __future__ import annotations

import html
import re
from dataclasses import replace

import mwparserfromhell as mwp
from mwparserfromhell import nodes

from pipeline.data.document import Counts, Document
from pipeline.data.stage import Stage

# Tags whose whole content is not prose (or is markup we cannot render as text).
DROP_TAGS = frozenset(
    {
        "ref",
        "references",
        "gallery",
        "math",
        "chem",
        "ce",
        "table",
        "timeline",
        "score",
        "graph",
        "imagemap",
        "templatestyles",
        "mapframe",
        "maplink",
        "inputbox",
        "categorytree",
        "hiero",
        "indicator",
        "section",
        "noinclude",
        "includeonly",
        "onlyinclude",
        "syntaxhighlight",
        "source",
    }
)
# Canonical names of the namespaces whose links render as media or page categories, not text.
MEDIA_NAMESPACES = frozenset({"file", "image", "media", "category"})
_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z0-9]+)*$")  # interlanguage link prefixes: de, zh-yue, be-x-old
# File links under a namespace alias the siteinfo does not list (lv "Attēls:") are known by the file name.
_MEDIA_FILE = re.compile(
    r"^[^:|\]]+:[^|\]]+\.(jpe?g|png|gif|svg|tiff?|webp|xcf|og[agv]|webm|mp3|wav|flac|midi?|pdf|djvu)\s*(\||$)",
    re.I,
)
_LEFTOVER_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_TABLE_LINE = re.compile(r"^\s*(\{\||\|\}|\|-|\|\+|!)")
_PARAM_LINE = re.compile(r"^\s*\|\s*[^|=\n\[\]{}]{1,60}?\s*=")  # "| key = value": a template parameter
_HALF_LINK = re.compile(r"\[([^\[\]|\n]*)\|([^\[\]\n]*)\]\]")  # [target|label]] with one bracket lost
_LEAK_LINE = re.compile(r"\{\{|\}\}|\[\[|\]\]|^\s*\|\s*[^|=\n\[\]{}]{1,60}?\s*=", re.M)
_SEP = "[,;，；、]"
_OPEN_SEPS = re.compile(rf"([(（])\s*(?:{_SEP}\s*)+")  # "(, , x" -> "(x"
_CLOSE_SEPS = re.compile(rf"(?:\s*{_SEP})+\s*([)）])")  # "x, )" -> "x)"
_SEP_RUN = re.compile(rf"({_SEP})(?:\s*{_SEP})+")  # "a, , b" -> "a, b" (inside brackets only)
_EMPTY_BRACKETS = re.compile(r"[ \t]*(?:\(\s*\)|（\s*）|\[\s*\]|「\s*」|『\s*』|《\s*》|【\s*】)")
_PAREN_GROUP = re.compile(r"[(（][^()（）\n]*[)）]")
_QUOTE_RUN = re.compile(r"'{2,}")  # '' italic, ''' bold: markup left where the parser gave up
_DROP_ELEMENT = re.compile(r"<(" + "|".join(sorted(DROP_TAGS)) + r")\b[^<>]*?(/>|>.*?</\1\s*>)", re.S | re.I)
_FORMAT_TAG = re.compile(
    r"</?(span|font|strong|b|i|u|s|em|small|big|sup|sub|div|center|code|tt|blockquote|p|abbr|del|ins|"
    r"nowiki|poem|pre|cite|var|kbd|mark|q|li|ul|ol|dl|dt|dd|br|hr)\b[^<>]*>",
    re.I,
)


def _link_drop_names(site: dict | None) -> frozenset[str]:
    """Lower-cased namespace names whose links are dropped: canonical plus the wiki's own (-2, 6, 14)."""
    local = {(site or {}).get("namespaces", {}).get(k, "") for k in (-2, 6, 14)}
    return MEDIA_NAMESPACES | {n.lower() for n in local if n}


class WikitextExtractor(Stage):
    """Turn a document's wikitext into plain text; `site` is the dump's siteinfo (local namespace names)."""

    name = "wikitext"

    def __init__(self, site: dict | None = None):
        self.drop_names = _link_drop_names(site)

    def process_one(self, doc: Document) -> Document | str:
        return replace(doc, text=wikitext_to_text(doc.text, self.drop_names))

    def process(self, docs: list[Document]) -> tuple[list[Document], Counts]:
        """Stage.process, plus the lines of the output that still look like markup (`markup_leak_lines`)."""
        kept, counts = super().process(docs)
        counts.note("markup_leak_lines", sum(markup_leak_lines(d.text) for d in kept))
        return kept, counts


def markup_leak_lines(text: str) -> int:
    """Lines of `text` holding `{{`, `}}`, `[[`, `]]` or a `| key =` template parameter."""
    return sum(1 for line in text.split("\n") if _LEAK_LINE.search(line))


def wikitext_to_text(wikitext: str, drop_names: frozenset[str] = MEDIA_NAMESPACES) -> str:
    """Plain text of a wikitext page (not yet whitespace-normalized: see filters.Normalize)."""
    text = _render(mwp.parse(wikitext, skip_style_tags=True), drop_names)
    return _remove_leftovers(text, drop_names)


def _remove_leftovers(text: str, drop_names: frozenset[str]) -> str:
    """Second pass over the rendered text for markup the parser left as plain text (unbalanced
    quotes, a file caption spanning lines, an unclosed tag): what MediaWiki would not show."""
    text = _remove_media_links(text, drop_names)
    text = _DROP_ELEMENT.sub("", text)
    text = _FORMAT_TAG.sub("", text)
    text = _QUOTE_RUN.sub("", _MAGIC_WORD.sub("", text))
    text = _remove_braces(text)
    text = _HALF_LINK.sub(r"\2", _LEFTOVER_LINK.sub(r"\1", text)).replace("[[", "").replace("]]", "")
    lines = _drop_table_lines([line for line in text.split("\n") if not _PARAM_LINE.match(line)])
    return "\n".join(_tidy_brackets(line) for line in lines)


def _remove_braces(text: str) -> str:
    """Remove every `{{ ... }}` span (nested, across lines) and stray `}}`; an unclosed `{{` is
    removed up to the end of its line, and the text after that line is cleaned the same way."""
    out = []
    while True:
        kept, unclosed_at = _brace_pass(text)
        out.append(kept)
        end = text.find("\n", unclosed_at) if unclosed_at >= 0 else -1
        if end < 0:
            return "".join(out)
        text = text[end:]


def _brace_pass(text: str) -> tuple[str, int]:
    """(text without its closed `{{...}}` spans and stray `}}`, position of an unclosed `{{` or -1);
    with an unclosed `{{`, the text kept ends where it opened."""
    out, depth, i, start, open_at = [], 0, 0, 0, -1
    while (j := _next_brace(text, i)) != -1:
        if text.startswith("{{", j):
            if depth == 0:
                out.append(text[start:j])
                open_at = j
            depth += 1
        elif depth:
            depth -= 1
            start = j + 2 if depth == 0 else start
        else:  # a "}}" that closes nothing
            out.append(text[start:j])
            start = j + 2
        i = j + 2
    if depth:
        return "".join(out), open_at
    out.append(text[start:])
    return "".join(out), -1


def _next_brace(text: str, i: int) -> int:
    """Position of the next `{{` or `}}` at or after `i`, or -1."""
    a, b = text.find("{{", i), text.find("}}", i)
    return a if b < 0 or 0 <= a < b else b


def _tidy_brackets(line: str) -> str:
    """Drop separators left at the edges of, or doubled inside, a bracket pair, then empty pairs."""
    if not any(c in line for c in "(（[「『《【"):
        return line
    line = _PAREN_GROUP.sub(
        lambda m: _SEP_RUN.sub(r"\1", _CLOSE_SEPS.sub(r"\1", _OPEN_SEPS.sub(r"\1", m.group()))), line
    )
    while (shorter := _EMPTY_BRACKETS.sub("", line)) != line:  # "(())" empties in two rounds
        line = shorter
    return line


def _remove_media_links(text: str, drop_names: frozenset[str]) -> str:
    """Cut `[[File:...]]`/`[[Category:...]]` spans, counting brackets so captions with links go too."""
    start = text.find("[[")
    while start != -1:
        head = text[start + 2 : start + 300]
        prefix = head.split(":", 1)[0].strip() if ":" in head else ""
        end = _matching_close(text, start) if _is_media(head, prefix, drop_names) else -1
        if end == -1:
            start = text.find("[[", start + 2)
            continue
        text = text[:start] + text[end:]
        start = text.find("[[", start)
    return text


def _matching_close(text: str, start: int) -> int:
    """Index just past the `]]` that closes the `[[` at `start`, or -1 if it is never closed."""
    depth, i = 0, start
    while i < len(text) - 1:
        pair = text[i : i + 2]
        if pair == "[[":
            depth, i = depth + 1, i + 2
        elif pair == "]]":
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return -1


def _drop_table_lines(lines: list[str]) -> list[str]:
    """Remove `{| ... |}` blocks (and stray row markup) that the parser did not recognize as tables."""
    out, depth = [], 0
    for line in lines:
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif stripped.startswith("|}") and depth:
            depth -= 1
        elif depth == 0 and not _TABLE_LINE.match(line):
            out.append(line)
    return out


def _render(code, drop_names: frozenset[str]) -> str:
    return "".join(_render_node(node, drop_names) for node in code.nodes) if code is not None else ""


def _render_node(node, drop_names: frozenset[str]) -> str:
    if isinstance(node, nodes.Text):
        return html.unescape(str(node.value))  # entities the parser left in unparsed markup
    if isinstance(node, nodes.Wikilink):
        return _render_link(node, drop_names)
    if isinstance(node, nodes.Tag):
        return _render_tag(node, drop_names)
    if isinstance(node, nodes.Heading):
        return "\n" + _render(node.title, drop_names).strip() + "\n"
    if isinstance(node, nodes.HTMLEntity):
        return node.normalize()
    if isinstance(node, nodes.ExternalLink):
        if node.title is not None:
            return _render(node.title, drop_names)
        return "" if node.brackets else str(node.url)  # [http://x] renders as a footnote number
    return ""  # Template, Argument, Comment: no prose


def _render_link(link: nodes.Wikilink, drop_names: frozenset[str]) -> str:
    title = str(link.title).strip()
    if not title.startswith(":"):  # a leading colon makes [[:Category:X]] an ordinary visible link
        prefix = title.split(":", 1)[0].strip() if ":" in title else ""
        # interlanguage prefixes are lower case ([[de:X]]); [[WP:X|text]] is a visible alias link
        if _is_media(title, prefix, drop_names) or _LANG_PREFIX.match(prefix):
            return ""
    if link.text is not None:
        return _render(link.text, drop_names)
    return html.unescape(title.lstrip(":"))


def _is_media(target: str, prefix: str, drop_names: frozenset[str]) -> bool:
    """A File/Image/Media/Category link, by namespace name or by a media file name."""
    return prefix.replace("_", " ").lower() in drop_names or bool(_MEDIA_FILE.match(target))


def _render_tag(tag: nodes.Tag, drop_names: frozenset[str]) -> str:
    name = str(tag.tag).strip().lower()
    if name in DROP_TAGS:
        return ""
    if name in ("br", "hr"):
        return "\n"
    if tag.self_closing or tag.contents is None:
        return ""
    return _render(tag.contents, drop_names)
