"""Region documents and the BM25 retriever over them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from langchain_core.documents import Document

from backend.retriever import LexicalRetriever, load_documents, split_sections
from backend.settings import DATA_ROOT, DEFAULT_ZONES, StartupError

__all__: list[str] = []


@pytest.mark.parametrize("region", sorted(DEFAULT_ZONES))
def test_every_demo_region_has_its_own_documents(region: str) -> None:
    docs = load_documents(DATA_ROOT / region, region=region)
    assert len(docs) >= 10
    assert {d.metadata["region"] for d in docs} == {region}
    assert {d.metadata["source"] for d in docs} >= {"datacentre.md", "regulation.md", "support.md"}
    assert all(region in d.page_content.splitlines()[0] for d in docs)  # "# <region> ..." title


def test_regions_share_no_section_text() -> None:
    texts = {
        region: {d.page_content for d in load_documents(DATA_ROOT / region, region=region)}
        for region in DEFAULT_ZONES
    }
    for region, mine in texts.items():
        for other, theirs in texts.items():
            if other != region:
                assert not mine & theirs


def test_split_sections_keeps_title_and_section_in_metadata() -> None:
    text = "# Facts\n\nIntro line.\n\n## Hours\n\nOpen late.\n\n## Empty\n"
    docs = split_sections(text, source="f.md", region="r-1")
    assert [(d.metadata["section"], d.page_content) for d in docs] == [
        ("", "# Facts\nIntro line."),
        ("Hours", "# Facts\n## Hours\n\nOpen late."),
    ]
    assert docs[0].metadata == {"source": "f.md", "region": "r-1", "title": "Facts", "section": ""}


def test_missing_region_folder_is_a_startup_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=str(tmp_path / "nowhere")):
        load_documents(tmp_path / "nowhere", region="nowhere")


def _docs(*texts: str) -> list[Document]:
    return [Document(page_content=t, metadata={"i": i}) for i, t in enumerate(texts)]


def test_bm25_ranks_rare_and_repeated_terms_first() -> None:
    retriever = LexicalRetriever(
        documents=_docs(
            "support desk email",
            "support hours are nine to five; hours vary on holidays",
            "data centre power and cooling",
            "support support support",
        ),
        k=2,
    )
    assert [d.metadata["i"] for d in retriever.invoke("support hours")] == [1, 3]
    scores = retriever.scores("cooling")
    assert scores[2] > 0
    assert scores[0] == scores[1] == scores[3] == 0


def test_no_match_falls_back_to_first_k_and_empty_corpus_gives_nothing() -> None:
    retriever = LexicalRetriever(documents=_docs("alpha", "beta", "gamma"), k=2)
    assert [d.metadata["i"] for d in retriever.invoke("zeta")] == [0, 1]
    assert LexicalRetriever(documents=[]).invoke("alpha") == []


async def test_async_and_sync_retrieval_agree() -> None:
    docs = await asyncio.to_thread(
        load_documents, DATA_ROOT / "eu-central-1", region="eu-central-1"
    )
    retriever = LexicalRetriever(documents=docs, k=3)
    query = "breach notification deadline"
    assert await retriever.ainvoke(query) == retriever.invoke(query)
    assert retriever.invoke(query)[0].metadata["section"] == "Breach notification"
