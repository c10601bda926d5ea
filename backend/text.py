"""Word-level text handling shared by the retriever and the offline model.

Rule: this module is pure. It never awaits, never reads a file and imports nothing from
LangChain or aiohttp, so both the retriever's scoring and the model's answers stay easy to
test and deterministic (same text in, same terms, sentences and tokens out).

Three views of a text:

* ``terms``: lowercase alphanumeric words minus English stop words, the unit of lexical
  scoring (BM25 in ``retriever.py``, sentence choice in ``models.py``);
* ``sentences``: the sentences of markdown paragraphs, the unit the offline model quotes;
* ``word_tokens``: word-ish pieces that keep their leading whitespace, so
  ``"".join(word_tokens(s)) == s.strip()``; the unit the offline model streams and counts.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["STOP_WORDS", "count_tokens", "sentences", "term_set", "terms", "word_tokens"]

STOP_WORDS = frozenset(
    """a about above after again all also am an and any are as at be been before being below
    between both but by can could did do does doing down during each few for from further had
    has have having he her here hers him his how i if in into is it its itself just me more most
    my no nor not now of off on once only or other our ours out over own same she should so some
    such than that the their theirs them then there these they this those through to too under
    until up very was we were what when where which while who whom why will with would you your
    yours tell please give know""".split()  # noqa: SIM905 (prose reads better than 130 items)
)

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_TOKEN = re.compile(r"\s*\S+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(`])")
_MARKDOWN_PREFIX = re.compile(r"^\s*(?:#{1,6}\s+|[-*+]\s+|\d+[.)]\s+|>\s*)")


def terms(text: str) -> list[str]:
    """Split ``text`` into lowercase scoring terms, stop words removed, order kept.

    Args:
        text: any text; markdown punctuation is ignored.

    Returns:
        Terms such as ``["support", "hours", "eu-west-1"]``; hyphenated and apostrophe
        words stay whole, so a region name is one term.
    """
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


@lru_cache(maxsize=8192)
def term_set(text: str) -> frozenset[str]:
    """Return the distinct ``terms`` of ``text``, memoised.

    The offline model scores the same system-prompt and document sentences on every call;
    caching their term sets keeps an answer at tens of microseconds.

    Args:
        text: any text.

    Returns:
        The set of terms.
    """
    return frozenset(terms(text))


@lru_cache(maxsize=1024)
def sentences(text: str) -> tuple[str, ...]:
    """Split markdown ``text`` into the sentences of its paragraphs.

    Heading lines are left out (they title a passage, they say nothing quotable); list and
    quote markers are stripped. A paragraph splits after ``.``, ``!`` or ``?`` followed by
    whitespace and a capital letter, digit or quote.

    Args:
        text: markdown or plain text.

    Returns:
        Stripped, non-empty sentences in document order (memoised: the same prompts and
        documents come back on every call).
    """
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        paragraph: list[str] = []
        for raw in block.splitlines():
            line = _MARKDOWN_PREFIX.sub("", raw).strip()
            if not line:
                continue
            if not raw.lstrip().startswith("#"):
                paragraph.append(line)
        if paragraph:
            joined = " ".join(paragraph)
            out.extend(s.strip() for s in _SENTENCE_END.split(joined) if s.strip())
    return tuple(out)


def word_tokens(text: str) -> list[str]:
    """Split ``text`` into word-ish tokens that keep their leading whitespace.

    Args:
        text: the text to split; trailing whitespace is dropped.

    Returns:
        Tokens such as ``["You", " asked:", " what"]``; joined they give ``text.rstrip()``
        with leading whitespace kept on the first token.
    """
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    """Count the word-ish tokens of ``text``, as ``len(word_tokens(text))`` without the list.

    Args:
        text: any text.

    Returns:
        The number of whitespace-separated pieces.
    """
    return sum(1 for _ in _TOKEN.finditer(text))
