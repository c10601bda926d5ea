"""LCEL chains of one region: ``chat`` and ``rag``, built once at startup.

Both chains read ``{"question": str}`` and return a string::

    chat = question -> chat_prompt -> model -> StrOutputParser
    rag  = question -> {messages, context: last question -> retriever -> join} -> rag_prompt
                    -> model -> StrOutputParser

The prompts take a whole conversation (``{"messages": [BaseMessage, ...]}``), so the
OpenAI-compatible route serves ``geogate-chat`` and ``geogate-rag`` with the very prompts
the LangServe routes use: one semantics per chain, whichever wire format asks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import PromptValue
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from pydantic import BaseModel, Field

from backend.retriever import LexicalRetriever

__all__ = [
    "CHAIN_NAMES",
    "CHAT_SYSTEM",
    "RAG_SYSTEM",
    "QuestionInput",
    "RegionChains",
    "build_chains",
    "format_documents",
    "last_question",
]

CHAIN_NAMES = ("chat", "rag")

CHAT_SYSTEM = (
    "You are the GeoGate assistant of region {region}. "
    "This region serves the residency zones {zones}. "
    "Answer briefly, and say so when you do not know."
)
RAG_SYSTEM = (
    CHAT_SYSTEM + " Answer from the context below, which holds documents of region {region}."
    "\n\n{context}"
)


class QuestionInput(BaseModel):
    """Input of the chat and rag chains: one question."""

    question: str = Field(description="The user's question, in plain text.")


def last_question(inputs: dict[str, Any]) -> str:
    """Return the text of the last human message of ``inputs["messages"]`` ("" if none)."""
    messages: Sequence[BaseMessage] = inputs["messages"]
    return next((m.text for m in reversed(messages) if m.type == "human"), "")


def format_documents(documents: Sequence[Document]) -> str:
    """Join retrieved sections into the prompt's context, one blank line apart."""
    return "\n\n".join(doc.page_content for doc in documents)


def _as_conversation(inputs: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [HumanMessage(content=inputs["question"])]}


def _step(func: Callable[[Any], Any], name: str) -> RunnableLambda[Any, Any]:
    """Wrap a cheap pure function as a runnable with an async twin.

    Without ``afunc``, ``RunnableLambda.ainvoke`` runs ``func`` in the default thread pool
    (``run_in_executor``): two thread hops per step, milliseconds under load.
    """

    async def afunc(value: Any) -> Any:
        return func(value)

    return RunnableLambda(func, afunc=afunc, name=name)


@dataclass(frozen=True, slots=True)
class RegionChains:
    """The runnables one region serves.

    Attributes:
        chat: ``{"question": str} -> str``, no retrieval.
        rag: ``{"question": str} -> str``, answers from the region's documents.
        prompts: ``"chat"`` / ``"rag"`` -> runnable from ``{"messages": [...]}`` to the
            PromptValue the model reads (what the OpenAI-compatible route asks for).
        model: the chat model both chains end with.
        retriever: the region's document retriever.
        chat_template: the chat prompt template (``prompts["chat"]`` itself).
        rag_template: the rag prompt template, after the retrieval step of ``prompts["rag"]``.
    """

    chat: Runnable[dict[str, Any], str]
    rag: Runnable[dict[str, Any], str]
    prompts: dict[str, Runnable[dict[str, Any], PromptValue]]
    model: BaseChatModel
    retriever: LexicalRetriever
    chat_template: ChatPromptTemplate
    rag_template: ChatPromptTemplate

    def by_name(self, name: str) -> Runnable[dict[str, Any], str] | None:
        """Return the LangServe chain called ``name``, or None."""
        if name == "chat":
            return self.chat
        if name == "rag":
            return self.rag
        return None

    async def conversation_prompt(self, name: str, messages: list[BaseMessage]) -> PromptValue:
        """Build the prompt ``prompts[name]`` would, on the request path's budget.

        Same PromptValue as ``await prompts[name].ainvoke({"messages": messages})``, but
        formatted with the template's own ``aformat_prompt``: a prompt runnable's callback
        bookkeeping costs ~100 µs per call, several times the formatting itself, and the
        OpenAI route is what benchmarks hammer. The retriever is still invoked as a runnable.

        Args:
            name: ``"chat"`` or ``"rag"``.
            messages: the conversation; for ``rag`` the last human message is the query.

        Returns:
            The PromptValue for the model.

        Raises:
            KeyError: ``name`` is neither.
        """
        if name == "chat":
            return await self.chat_template.aformat_prompt(messages=messages)
        if name == "rag":
            documents = await self.retriever.ainvoke(last_question({"messages": messages}))
            return await self.rag_template.aformat_prompt(
                messages=messages, context=format_documents(documents)
            )
        raise KeyError(name)


def build_chains(
    *, region: str, zones: Sequence[str], model: BaseChatModel, retriever: LexicalRetriever
) -> RegionChains:
    """Compose the region's chains with LCEL (no I/O; call once at startup).

    Args:
        region: region name, written into the system prompts.
        zones: residency zones the region serves, written into the system prompts.
        model: the chat model.
        retriever: the region's retriever (``rag`` only).

    Returns:
        The RegionChains.
    """
    names = {"region": region, "zones": ", ".join(zones)}
    chat_prompt = ChatPromptTemplate.from_messages(
        [("system", CHAT_SYSTEM), MessagesPlaceholder("messages")]
    ).partial(**names)
    rag_template = ChatPromptTemplate.from_messages(
        [("system", RAG_SYSTEM), MessagesPlaceholder("messages")]
    ).partial(**names)
    retrieve = _step(last_question, "last_question") | retriever | _step(format_documents, "format")
    rag_prompt = RunnablePassthrough.assign(context=retrieve) | rag_template
    question = _step(_as_conversation, "question")
    parser = StrOutputParser()
    chat = (question | chat_prompt | model | parser).with_types(
        input_type=QuestionInput, output_type=str
    )
    rag = (question | rag_prompt | model | parser).with_types(
        input_type=QuestionInput, output_type=str
    )
    return RegionChains(
        chat=chat.with_config(run_name="chat"),
        rag=rag.with_config(run_name="rag"),
        prompts={"chat": chat_prompt, "rag": rag_prompt},
        model=model,
        retriever=retriever,
        chat_template=chat_prompt,
        rag_template=rag_template,
    )
