"""Make the shipped sample: a Wikipedia-format dump and an instruction set from Python's own docs.

The text comes from the docstrings of the standard library of the Python that runs this
script, so the sample is ours to ship and needs no download. It writes, next to this file:

    sample/pywiki-sample.xml.bz2   MediaWiki export 0.10 with <siteinfo>; one article per module
                                   (wikitext with infobox templates, headings, links, bold, refs,
                                   categories), plus redirects and non-article pages as a real dump has
    sample/instructions.jsonl      Alpaca-style {instruction, input, output} rows about the same modules
    sample/preferences.jsonl       DPO pairs made from the first instruction rows: the row's answer
                                   is chosen, an evasive or off-topic answer rejected (text and
                                   two-turn chat records)

Run: python tests/data/make_sample.py   (deterministic for a given Python version)
     python tests/data/make_sample.py --preferences   (only preferences.jsonl, from instructions.jsonl)
"""

from __future__ import annotations

import bz2
import importlib
import inspect
import json
import pkgutil
import random
import re
import sys
import warnings
from pathlib import Path
from xml.sax.saxutils import escape

OUT = Path(__file__).resolve().parent / "sample"
SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "lib2to3",
    "ensurepip",
    "venv",
    "pydoc_data",
    "xxsubtype",
    "xxlimited",
    "__main__",
    "_pydecimal",
    "pyexpat",
    "msilib",
    "nturl2path",
    "tabnanny",
    "webbrowser",
}
TIMESTAMP = "2026-11-01T00:00:00Z"


def _paragraphs(doc: str | None) -> list[str]:
    if not doc:
        return []
    doc = inspect.cleandoc(doc)
    return [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]


def _modules() -> list[tuple[str, object]]:
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP)
    mods = []
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        if len(mod.__doc__ or "") > 80:
            mods.append((name, mod))
        for sub in _submodules(mod):
            mods.append((sub.__name__, sub))
    return mods


def _submodules(pkg) -> list:
    """Public submodules of a package that import cleanly and have a docstring worth an article."""
    out = []
    for info in pkgutil.iter_modules(getattr(pkg, "__path__", []) or []):
        if info.name.startswith("_") or info.name in SKIP or "test" in info.name:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sub = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception:
            continue
        if len(sub.__doc__ or "") > 80:
            out.append(sub)
    return out


def _members(mod) -> list[tuple[str, str, list[str]]]:
    out = []
    for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", mod.__name__) not in (mod.__name__, None):
            continue
        paras = _paragraphs(getattr(obj, "__doc__", None))
        if paras and len(paras[0]) > 20 and not _is_signature(paras[0]):
            out.append((attr, "class" if inspect.isclass(obj) else "function", paras))
    return out[:40]


def _is_signature(text: str) -> bool:
    """Builtins often start their docstring with a call signature; that is not prose."""
    return (
        bool(re.match(r"^[\w.]+\(.*\)( -> .*)?$", text))
        or "(" in text[:30]
        and ")" in text[:60]
        and "-->" in text
    )


def _article(name: str, mod, members, all_names: set[str]) -> str:
    paras = _paragraphs(mod.__doc__)
    kind = "package" if hasattr(mod, "__path__") else "module"
    lines = [
        f"{{{{Infobox software\n| name = {name}\n| type = Python {kind}\n| license = PSF}}}}",
        f"'''{name}''' is a {kind} of the [[Python (programming language)|Python]] standard library.<ref>Python "
        f"{sys.version_info.major}.{sys.version_info.minor} documentation</ref> {paras[0]}",
    ]
    lines += paras[1:8]
    if members:
        lines.append("== Contents ==")
        for attr, what, mparas in members:
            lines.append(f"=== {attr} ===")
            lines.append(f"The {what} '''{attr}''' of [[{name}]]: {mparas[0]}")
            lines += mparas[1:3]
    related = sorted(n for n in all_names if n != name and n.split(".")[0] == name.split(".")[0])[:5]
    if related:
        lines.append("== See also ==")
        lines += [f"* [[{r}]]" for r in related]
    lines.append('{| class="wikitable"\n! Property !! Value\n|-\n| Kind || ' + kind + "\n|}")
    lines.append("[[Category:Python standard library]]")
    return "\n\n".join(lines)


def _page(title: str, pid: int, ns: int, text: str, redirect: str | None = None) -> str:
    red = f'    <redirect title="{escape(redirect)}" />\n' if redirect else ""
    return (
        f"  <page>\n    <title>{escape(title)}</title>\n    <ns>{ns}</ns>\n    <id>{pid}</id>\n{red}"
        f"    <revision>\n      <id>{pid * 10}</id>\n      <timestamp>{TIMESTAMP}</timestamp>\n"
        f"      <model>wikitext</model>\n      <format>text/x-wiki</format>\n"
        f'      <text bytes="{len(text.encode())}" xml:space="preserve">{escape(text)}</text>\n'
        f"    </revision>\n  </page>\n"
    )


def _instructions(mods, members_of, rng: random.Random) -> list[dict]:
    rows = []
    for name, mod in mods:
        paras = _paragraphs(mod.__doc__)
        rows.append(
            {"instruction": f"What is the Python module {name} for?", "input": "", "output": paras[0]}
        )
        for attr, what, mparas in members_of[name]:
            rows.append(
                {
                    "instruction": f"Explain what this Python {what} does.",
                    "input": f"{name}.{attr}",
                    "output": mparas[0],
                }
            )
    rng.shuffle(rows)
    return rows[:1500]


EVASIVE = (
    "I am not sure.",
    "Sorry, I cannot help with that.",
    "It does something in Python.",
    "Please read the documentation.",
)


def _question(row: dict) -> str:
    return f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]


def _preferences(rows: list[dict], n: int = 400) -> list[dict]:
    """Preference records from the first n instruction rows, in three shapes (Alpaca-style
    instruction/input, prompt, and a chat whose first turn is the previous row's question and answer);
    the rejected answer is evasive (even rows) or another row's answer, off topic (odd rows)."""
    rows, out = rows[:n], []
    for i, row in enumerate(rows):
        rejected = EVASIVE[(i // 2) % len(EVASIVE)] if i % 2 == 0 else rows[(i + 37) % len(rows)]["output"]
        answers = {"chosen": row["output"], "rejected": rejected}
        if i % 4 == 3:
            prev = rows[i - 1]
            turns = [("user", _question(prev)), ("assistant", prev["output"]), ("user", _question(row))]
            out.append({"messages": [{"role": r, "content": c} for r, c in turns], **answers})
        elif i % 4 == 1:
            out.append({"prompt": _question(row), **answers})
        else:
            out.append({"instruction": row["instruction"], "input": row["input"], **answers})
    return out


def write_preferences() -> None:
    """sample/preferences.jsonl from sample/instructions.jsonl."""
    rows = [
        json.loads(line) for line in (OUT / "instructions.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    with open(OUT / "preferences.jsonl", "w", encoding="utf-8") as fh:
        for rec in _preferences(rows):
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main() -> None:
    if sys.argv[1:] == ["--preferences"]:
        write_preferences()
        return
    rng = random.Random(0)
    mods = _modules()
    all_names = {n for n, _ in mods}
    members_of = {n: _members(m) for n, m in mods}
    head = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">\n'
        "  <siteinfo>\n    <sitename>PyWiki</sitename>\n    <dbname>pywiki</dbname>\n"
        "    <base>https://pywiki.invalid/wiki/Main_Page</base>\n    <generator>gristmill make_sample</generator>\n"
        '    <case>first-letter</case>\n    <namespaces>\n      <namespace key="0" case="first-letter" />\n'
        '      <namespace key="4" case="first-letter">PyWiki</namespace>\n    </namespaces>\n  </siteinfo>\n'
    )
    pages, pid = [], 1
    for name, mod in mods:
        pages.append(_page(name, pid, 0, _article(name, mod, members_of[name], all_names)))
        pid += 1
        if rng.random() < 0.1:  # a redirect, as real dumps have many
            pages.append(_page(f"Python {name}", pid, 0, f"#REDIRECT [[{name}]]", redirect=name))
            pid += 1
    pages.append(_page("PyWiki:About", pid, 4, "This wiki is generated from Python's docstrings."))
    xml = head + "".join(pages) + "</mediawiki>\n"
    OUT.mkdir(exist_ok=True)
    (OUT / "pywiki-sample.xml.bz2").write_bytes(bz2.compress(xml.encode("utf-8"), 9))
    with open(OUT / "instructions.jsonl", "w", encoding="utf-8") as fh:
        for row in _instructions(mods, members_of, rng):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_preferences()
    print(f"{len(mods)} articles, {len(pages)} pages, {len(xml) / 1e6:.1f} MB of XML")


if __name__ == "__main__":
    main()
