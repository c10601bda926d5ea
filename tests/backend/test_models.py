"""The offline chat model: deterministic answers, limits, usage, timing; provider choice."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage

from backend.models import (
    OfflineChatModel,
    compose_answer,
    health_model,
    make_chat_model,
    plan_answer,
)
from backend.settings import BackendSettings, StartupError
from backend.text import word_tokens

__all__: list[str] = []

CONTEXT = (
    "You are the assistant of region eu-west-1. The desk opens at 08:00 Irish time. "
    "Cats like warm data halls. Support hours end at 18:00."
)
MESSAGES = [SystemMessage(content=CONTEXT), HumanMessage(content="When do support hours end?")]


def test_answer_restates_question_and_quotes_best_sentences_in_order() -> None:
    assert compose_answer(MESSAGES) == (
        'You asked: "When do support hours end?" Here is what I found: Support hours end at 18:00.'
    )


def test_answer_without_matching_context_says_so() -> None:
    answer = compose_answer([SystemMessage(content=CONTEXT), HumanMessage(content="weather")])
    assert answer == 'You asked: "weather". I found nothing about that in my context.'


def test_same_messages_same_answer_across_instances_and_apis() -> None:
    fast, slow = OfflineChatModel(), OfflineChatModel(ttft_ms=1, tokens_per_second=10_000)
    invoked = fast.invoke(MESSAGES)
    streamed = "".join(chunk.text for chunk in slow.stream(MESSAGES))
    assert invoked.text == streamed == fast.invoke(MESSAGES).text == compose_answer(MESSAGES)


def test_usage_counts_word_tokens() -> None:
    message = OfflineChatModel().invoke(MESSAGES)
    prompt_tokens = len(word_tokens(CONTEXT)) + len(word_tokens("When do support hours end?"))
    assert message.usage_metadata == {
        "input_tokens": prompt_tokens,
        "output_tokens": len(word_tokens(message.text)),
        "total_tokens": prompt_tokens + len(word_tokens(message.text)),
    }
    assert message.response_metadata["finish_reason"] == "stop"


def test_max_tokens_cuts_with_finish_reason_length() -> None:
    message = OfflineChatModel().invoke(MESSAGES, max_tokens=3)
    assert message.text == 'You asked: "When'
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] == 3
    assert OfflineChatModel(max_tokens=2).invoke(MESSAGES).text == "You asked:"


def test_stop_sequence_ends_the_answer_before_it() -> None:
    message = OfflineChatModel().invoke(MESSAGES, stop=[" Here is"])
    assert message.text == 'You asked: "When do support hours end?"'
    assert message.response_metadata["finish_reason"] == "stop"


def test_max_tokens_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        plan_answer(MESSAGES, stop=None, max_tokens=0)


async def test_astream_yields_token_chunks_with_usage_on_the_last() -> None:
    chunks = [chunk async for chunk in OfflineChatModel().astream(MESSAGES)]
    assert [c.text for c in chunks] == word_tokens(compose_answer(MESSAGES))
    assert all(c.usage_metadata is None for c in chunks[:-1])
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert isinstance(total, AIMessageChunk)
    assert total.usage_metadata is not None
    assert total.usage_metadata["output_tokens"] == len(chunks)
    assert total.response_metadata["finish_reason"] == "stop"


async def test_astream_paces_tokens_by_ttft_and_rate() -> None:
    model = OfflineChatModel(ttft_ms=20, tokens_per_second=400)
    loop = asyncio.get_running_loop()
    started = loop.time()
    times = [loop.time() - started async for _ in model.astream(MESSAGES)]
    assert len(times) > 10
    # Lower bounds only: a sleep never ends early, a busy machine may make it end late.
    assert times[0] >= 0.020 - 0.002
    assert times[-1] >= 0.020 + (len(times) - 1) / 400 - 0.002
    assert times == sorted(times)


async def test_health_model_drops_delays_only() -> None:
    model = OfflineChatModel(ttft_ms=10_000, tokens_per_second=1)
    probe = health_model(model)
    assert (probe.ttft_ms, probe.tokens_per_second) == (0.0, 0.0)
    assert (model.ttft_ms, model.tokens_per_second) == (10_000, 1)
    async with asyncio.timeout(1):
        assert (await probe.ainvoke(MESSAGES, max_tokens=1)).text == "You"


def test_offline_provider_uses_settings_timing() -> None:
    settings = BackendSettings(region="r", zones=("global",), ttft_ms=5, tokens_per_second=50)
    model = make_chat_model(settings)
    assert isinstance(model, OfflineChatModel)
    assert (model.ttft_ms, model.tokens_per_second) == (5, 50)


@pytest.mark.skipif(
    importlib.util.find_spec("langchain_openai") is not None,
    reason="langchain-openai is installed; the missing-extra error cannot happen",
)
def test_openai_provider_without_extra_is_a_clear_startup_error() -> None:
    settings = BackendSettings(region="r", zones=("global",), provider="openai", openai_model="m")
    with pytest.raises(StartupError, match=r"pip install 'geogate\[openai\]'"):
        make_chat_model(settings)
