"""LCEL chains of a region: chat and rag, their schemas and their shared prompts."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from backend.chains import QuestionInput, RegionChains, build_chains
from backend.models import OfflineChatModel
from backend.retriever import LexicalRetriever, load_documents
from backend.settings import DATA_ROOT, DEFAULT_ZONES

__all__: list[str] = []


async def _chains(region: str) -> RegionChains:
    docs = await asyncio.to_thread(load_documents, DATA_ROOT / region, region=region)
    return build_chains(
        region=region,
        zones=DEFAULT_ZONES[region],
        model=OfflineChatModel(),
        retriever=LexicalRetriever(documents=docs),
    )


async def test_chat_answers_from_the_region_system_prompt() -> None:
    chains = await _chains("us-east-1")
    answer = await chains.chat.ainvoke({"question": "Which region and zones are you serving?"})
    assert answer.startswith('You asked: "Which region and zones are you serving?"')
    assert "region us-east-1" in answer
    assert "zones us, global" in answer


async def test_rag_answers_from_retrieved_region_documents() -> None:
    chains = await _chains("eu-central-1")
    answer = await chains.rag.ainvoke({"question": "Where is the data centre located?"})
    assert "Frankfurt am Main" in answer


async def test_rag_stream_joins_to_invoke() -> None:
    chains = await _chains("ap-southeast-1")
    question = {"question": "What are the support hours?"}
    chunks = [chunk async for chunk in chains.rag.astream(question)]
    assert len(chunks) > 10
    assert "".join(chunks) == await chains.rag.ainvoke(question)


async def test_schemas_describe_question_in_and_string_out() -> None:
    chains = await _chains("eu-west-1")
    for chain in (chains.chat, chains.rag):
        assert chain.get_input_schema() is QuestionInput
        schema = chain.get_input_schema().model_json_schema()
        assert schema["required"] == ["question"]
        assert schema["properties"]["question"]["type"] == "string"
        assert chain.get_output_schema().model_json_schema()["type"] == "string"


@pytest.mark.parametrize("name", ["chat", "rag"])
async def test_fast_conversation_prompt_equals_the_prompt_runnable(name: str) -> None:
    chains = await _chains("eu-west-1")
    messages = [
        SystemMessage(content="Be terse."),
        HumanMessage(content="Hello"),
        AIMessage(content="Hi."),
        HumanMessage(content="What is the breach notification deadline?"),
    ]
    fast = await chains.conversation_prompt(name, messages)
    assert fast == await chains.prompts[name].ainvoke({"messages": messages})
    with pytest.raises(KeyError):
        await chains.conversation_prompt("nope", messages)
