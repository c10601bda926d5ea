"""Chat models: the embedded deterministic offline model, and the choice of provider.

``OfflineChatModel`` needs no network and no weights. It answers from its prompt alone:
it restates the last human message and quotes the system-prompt sentences (the region's
instructions and, for ``rag``, the retrieved context) that share the most terms with it.
Same messages, same answer; the region shows through the context, never through the model.

It imitates a hosted LLM's timing on the loop clock: the first token is due ``ttft_ms``
after the call, token ``i`` at ``ttft_ms / 1000 + i / tokens_per_second`` seconds; 0 turns
either delay off (benchmarks). Tokens are word-ish pieces (``backend.text.word_tokens``);
usage counts them the same way, reported as ``usage_metadata`` on the final message or
chunk, as LangChain's OpenAI integration does with ``stream_usage=True``.

``make_chat_model`` picks the provider: the offline model, or langchain-openai's
``ChatOpenAI`` against any OpenAI-compatible base URL (optional extra ``geogate[openai]``,
imported lazily).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field

from backend.settings import MS, BackendSettings, StartupError
from backend.text import count_tokens, sentences, term_set, word_tokens

__all__ = [
    "MAX_QUOTES",
    "OFFLINE_MODEL_NAME",
    "AnswerPlan",
    "OfflineChatModel",
    "compose_answer",
    "health_model",
    "make_chat_model",
    "plan_answer",
]

OFFLINE_MODEL_NAME = "geogate-offline"
MAX_QUOTES = 3
"""Sentences of context an offline answer quotes at most."""


def compose_answer(messages: Sequence[BaseMessage]) -> str:
    """Write the offline model's full answer to ``messages`` (pure, deterministic).

    The question is the last human message. Candidate sentences come from the system
    messages (``backend.text.sentences``). A sentence scores the sum, over the distinct
    question terms it contains, of ``ln(1 + S / s_t)`` (``S`` candidate sentences, ``s_t``
    of them holding term ``t``), so a rare term such as "hours" outweighs one that is
    everywhere. The best ``MAX_QUOTES`` sentences with a score above 0 are quoted in prompt
    order; ties go to the earlier sentence.

    Args:
        messages: the prompt, e.g. ``[SystemMessage(context), HumanMessage(question)]``.

    Returns:
        ``You asked: "<question>". Here is what I found: <sentences>`` or, when no sentence
        shares a term with the question, ``... I found nothing about that in my context.``
    """
    question = next((m.text for m in reversed(messages) if m.type == "human"), "")
    question = " ".join(question.split())
    wanted = term_set(question)
    candidates: list[tuple[str, frozenset[str]]] = []
    seen: set[str] = set()
    for message in messages:
        if message.type != "system":
            continue
        for sentence in sentences(message.text):
            if sentence not in seen:
                seen.add(sentence)
                candidates.append((sentence, wanted & term_set(sentence)))
    holding = Counter(term for _, found in candidates for term in found)
    weight = {term: math.log(1.0 + len(candidates) / n) for term, n in holding.items()}
    scored = [
        (-sum(weight[t] for t in found), order, sentence)
        for order, (sentence, found) in enumerate(candidates)
        if found
    ]
    best = sorted(sorted(scored)[:MAX_QUOTES], key=lambda item: item[1])
    opening = f'You asked: "{question}"' + ("" if question.endswith((".", "?", "!")) else ".")
    if not best:
        return f"{opening} I found nothing about that in my context."
    return f"{opening} Here is what I found: " + " ".join(s for _, _, s in best)


@dataclass(frozen=True, slots=True)
class AnswerPlan:
    """What one offline call will emit.

    Attributes:
        tokens: the word-ish tokens to emit, already cut by ``stop`` and ``max_tokens``.
        finish_reason: ``"stop"`` or ``"length"`` (``max_tokens`` cut the answer), the
            values of the OpenAI API reference.
        prompt_tokens: word-ish tokens of all prompt messages.
    """

    tokens: list[str]
    finish_reason: str
    prompt_tokens: int

    def usage(self, emitted: int) -> UsageMetadata:
        """Usage after ``emitted`` tokens, as LangChain's ``UsageMetadata``."""
        return UsageMetadata(
            input_tokens=self.prompt_tokens,
            output_tokens=emitted,
            total_tokens=self.prompt_tokens + emitted,
        )


def plan_answer(
    messages: Sequence[BaseMessage], *, stop: Sequence[str] | None, max_tokens: int | None
) -> AnswerPlan:
    """Compose the answer and apply ``stop`` and ``max_tokens`` to it (pure).

    Args:
        messages: the prompt.
        stop: strings that end the answer where they first occur (excluded), as the
            OpenAI API's ``stop``; None or empty for none.
        max_tokens: most tokens to emit, or None for no limit.

    Returns:
        The AnswerPlan.

    Raises:
        ValueError: ``max_tokens`` is below 1.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    answer = compose_answer(messages)
    for marker in stop or ():
        if marker and (cut := answer.find(marker)) >= 0:
            answer = answer[:cut]
    tokens = word_tokens(answer)
    finish_reason = "stop"
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens, finish_reason = tokens[:max_tokens], "length"
    prompt_tokens = sum(count_tokens(m.text) for m in messages)
    return AnswerPlan(tokens=tokens, finish_reason=finish_reason, prompt_tokens=prompt_tokens)


class OfflineChatModel(BaseChatModel):
    """Deterministic chat model that answers from its prompt, with LLM-like timing.

    Args:
        ttft_ms: time to first token (ms); 0 for none.
        tokens_per_second: rate of the tokens after the first; 0 for no delay.
        max_tokens: default answer length limit (tokens), overridable per call with the
            ``max_tokens`` keyword as in ``model.ainvoke(messages, max_tokens=5)``.
        temperature: accepted so that OpenAI-style callers can pass it; ignored.

    The final message or chunk carries ``usage_metadata`` and
    ``response_metadata = {"finish_reason": ..., "model_name": ...}``.
    """

    model_name: str = OFFLINE_MODEL_NAME
    ttft_ms: float = Field(default=0.0, ge=0.0)
    tokens_per_second: float = Field(default=0.0, ge=0.0)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None

    @property
    def _llm_type(self) -> str:
        return OFFLINE_MODEL_NAME

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "ttft_ms": self.ttft_ms,
            "tokens_per_second": self.tokens_per_second,
        }

    def _plan(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> AnswerPlan:
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        return plan_answer(messages, stop=stop, max_tokens=max_tokens)

    def due(self, index: int) -> float:
        """Seconds after the call at which token ``index`` (0-based) is emitted."""
        step = (index / self.tokens_per_second) if self.tokens_per_second > 0 else 0.0
        return self.ttft_ms * MS + step

    def _final_metadata(self, plan: AnswerPlan) -> dict[str, Any]:
        return {"finish_reason": plan.finish_reason, "model_name": self.model_name}

    def _result(self, plan: AnswerPlan) -> ChatResult:
        message = AIMessage(
            content="".join(plan.tokens),
            usage_metadata=plan.usage(len(plan.tokens)),
            response_metadata=self._final_metadata(plan),
        )
        info = {"finish_reason": plan.finish_reason}
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info=info)],
            llm_output={"model_name": self.model_name},
        )

    def _chunk(self, plan: AnswerPlan, index: int) -> ChatGenerationChunk:
        token = plan.tokens[index]
        if index < len(plan.tokens) - 1:
            return ChatGenerationChunk(message=AIMessageChunk(content=token))
        message = AIMessageChunk(
            content=token,
            usage_metadata=plan.usage(len(plan.tokens)),
            response_metadata=self._final_metadata(plan),
            chunk_position="last",
        )
        return ChatGenerationChunk(
            message=message, generation_info={"finish_reason": plan.finish_reason}
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        plan = self._plan(messages, stop, kwargs)
        if plan.tokens and (wait := self.due(len(plan.tokens) - 1)) > 0:
            time.sleep(wait)
        return self._result(plan)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        plan = self._plan(messages, stop, kwargs)
        if plan.tokens and (wait := self.due(len(plan.tokens) - 1)) > 0:
            await asyncio.sleep(wait)
        return self._result(plan)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        plan = self._plan(messages, stop, kwargs)
        start = time.monotonic()
        for index in range(len(plan.tokens)):
            if (wait := start + self.due(index) - time.monotonic()) > 0:
                time.sleep(wait)
            chunk = self._chunk(plan, index)
            if run_manager is not None:
                run_manager.on_llm_new_token(plan.tokens[index], chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        plan = self._plan(messages, stop, kwargs)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index in range(len(plan.tokens)):
            # Sleep until the token's due time rather than a fixed gap: the rate holds even
            # when the consumer is slow to take each chunk.
            if (wait := start + self.due(index) - loop.time()) > 0:
                await asyncio.sleep(wait)
            chunk = self._chunk(plan, index)
            if run_manager is not None:
                await run_manager.on_llm_new_token(plan.tokens[index], chunk=chunk)
            yield chunk


def make_chat_model(settings: BackendSettings) -> BaseChatModel:
    """Build the chat model ``settings.provider`` asks for (no I/O).

    Args:
        settings: ``provider`` ``"offline"`` uses ``ttft_ms`` and ``tokens_per_second``;
            ``"openai"`` uses ``openai_base_url``, ``openai_model`` and the
            ``OPENAI_API_KEY`` environment variable.

    Returns:
        An ``OfflineChatModel`` or a langchain-openai ``ChatOpenAI`` (``stream_usage=True``
        so that streamed answers report usage too).

    Raises:
        StartupError: langchain-openai is not installed, or the model name or key is missing.
    """
    if settings.provider == "offline":
        return OfflineChatModel(
            ttft_ms=settings.ttft_ms, tokens_per_second=settings.tokens_per_second
        )
    try:
        from langchain_openai import ChatOpenAI  # optional extra: imported on demand
    except ImportError as exc:
        raise StartupError(
            "--provider openai needs the optional dependency langchain-openai: "
            "pip install 'geogate[openai]'"
        ) from exc
    if not settings.openai_model:
        raise StartupError("--provider openai needs --openai-model")
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        raise StartupError("--provider openai needs the OPENAI_API_KEY environment variable")
    model: BaseChatModel = ChatOpenAI(
        model=settings.openai_model,
        base_url=settings.openai_base_url,
        api_key=api_key,
        stream_usage=True,
    )
    return model


def health_model(model: BaseChatModel) -> BaseChatModel:
    """Return the model the deep health probe asks: the offline model without its delays.

    Args:
        model: the serving model.

    Returns:
        A zero-delay copy of an ``OfflineChatModel``; any other model as is (the probe then
        asks it for one token).
    """
    if isinstance(model, OfflineChatModel):
        return model.model_copy(update={"ttft_ms": 0.0, "tokens_per_second": 0.0})
    return model
