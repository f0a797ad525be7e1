"""Whole-word name matching: which texts name a subject or an answer (accent- and case-free)."""

from __future__ import annotations

import re
import unicodedata


def normalize_words(text: str) -> tuple[str, ...]:
    """Lower-cased, accent-free alphanumeric words: "Brasília, D.C." -> ("brasilia", "d", "c")."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()
    return tuple(re.findall(r"[a-z0-9]+", plain))


def mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as a whole-word sequence (after :func:`normalize_words`)."""
    needle = normalize_words(phrase)
    if not needle:
        return False
    hay = normalize_words(text)
    n = len(needle)
    return any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


def leaks_answer(subject: str, obj: str) -> bool:
    """True when subject and object name each other ("Mexico" -> "Mexico City"): a trivial probe."""
    return mentions(subject, obj) or mentions(obj, subject)


class NamedIn:
    """Whole-word "is this phrase named anywhere in these texts" over a fixed corpus, fast.

    Every word n-gram (up to ``longest`` words) of the texts is indexed once; longer phrases fall
    back to :func:`mentions` on each text.
    """

    def __init__(self, texts: list[str], longest: int = 8):
        self.texts = texts
        self.longest = longest
        self.grams: set[tuple[str, ...]] = set()
        for text in texts:
            words = normalize_words(text)
            for n in range(1, longest + 1):
                self.grams.update(words[i : i + n] for i in range(len(words) - n + 1))

    def __call__(self, phrase: str) -> bool:
        needle = normalize_words(phrase)
        if not needle:
            return False
        if len(needle) <= self.longest:
            return needle in self.grams
        return any(mentions(text, phrase) for text in self.texts)
