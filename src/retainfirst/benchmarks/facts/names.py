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
