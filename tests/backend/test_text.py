"""Word-level text helpers: scoring terms, quotable sentences, streamed tokens."""

from __future__ import annotations

import pytest

from backend.text import count_tokens, sentences, term_set, terms, word_tokens

__all__: list[str] = []


def test_terms_drop_stop_words_and_keep_region_names_whole() -> None:
    assert terms("What are the Support hours in eu-west-1? St Patrick's Day") == [
        "support",
        "hours",
        "eu-west-1",
        "st",
        "patrick's",
        "day",
    ]
    assert term_set("the hours, the HOURS") == frozenset({"hours"})


def test_sentences_skip_headings_and_strip_list_markers() -> None:
    text = "# Title\n\n## Hours\n\nOpen 9 to 5. Closed on Sunday!\nAsk us.\n\n- A listed fact.\n"
    assert sentences(text) == ("Open 9 to 5.", "Closed on Sunday!", "Ask us.", "A listed fact.")


def test_sentences_do_not_split_inside_numbers_or_addresses() -> None:
    text = "Mail support-ie@geogate.example or call +353 1 555 0199. Open at 08:00 daily."
    assert sentences(text) == (
        "Mail support-ie@geogate.example or call +353 1 555 0199.",
        "Open at 08:00 daily.",
    )


@pytest.mark.parametrize(
    "text",
    ["You asked: what?", "one", "  leading space kept", 'quote "inside" and\nnewline'],
)
def test_word_tokens_join_back_to_the_text(text: str) -> None:
    tokens = word_tokens(text)
    assert "".join(tokens) == text.rstrip()
    assert count_tokens(text) == len(tokens)
    assert all(token.strip() for token in tokens)
