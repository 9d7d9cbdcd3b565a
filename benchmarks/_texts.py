"""Natural English text that ships with Python itself, for teacher-forced accuracy runs (no downloads).

Source: the stdlib module ``pydoc_data.topics`` — the plain-text Python Language Reference and Library
Reference sections that ``help()`` shows (© Python Software Foundation, PSF licence).  It is technical
prose; :func:`english_prose` keeps only its prose paragraphs (no code examples, no tables, no
interactive sessions) so the text reads as running English.  Deterministic: the same Python version
gives the same text.
"""

from __future__ import annotations

import re

SOURCE = "Python stdlib pydoc_data.topics (Language/Library Reference prose, code blocks removed)"

# Topics read first (the most prose-heavy sections), then every other topic in sorted order.
PREFERRED_TOPICS = (
    "execmodel", "import", "naming", "exceptions", "datamodel", "customization", "attribute-access",
    "specialnames", "compound", "types", "comparisons", "assignment", "atom-identifiers", "bltin-null-object",
    "truth", "typesmapping", "typesseq", "strings", "formatstrings",
)

_WORD = re.compile(r"[A-Za-z]{2,}")


def _is_prose(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    if not lines or any(line.startswith((" ", "\t")) for line in lines):  # code blocks, tables, lists
        return False
    if any(mark in paragraph for mark in (">>>", "::", "+--", "===", "***", "---", "|")):
        return False
    words = _WORD.findall(paragraph)
    return len(words) >= 12 and sum(map(len, words)) >= 0.6 * len(paragraph)  # mostly words, few symbols


def english_prose(min_chars: int = 20_000) -> tuple[str, list[str]]:
    """``(text, topics used)``: prose paragraphs of ``pydoc_data.topics``, joined by blank lines, at
    least ``min_chars`` characters long when the module holds that much (all of it otherwise)."""
    from pydoc_data.topics import topics

    order = [t for t in PREFERRED_TOPICS if t in topics] + sorted(set(topics) - set(PREFERRED_TOPICS))
    paragraphs: list[str] = []
    used: list[str] = []
    size = 0
    for topic in order:
        kept = [" ".join(p.split()) for p in re.split(r"\n\s*\n", topics[topic]) if _is_prose(p)]
        if not kept:
            continue
        used.append(topic)
        paragraphs.extend(kept)
        size += sum(len(p) + 2 for p in kept)
        if size >= min_chars:
            break
    return "\n\n".join(paragraphs), used
