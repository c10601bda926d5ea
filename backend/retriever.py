"""A region's documents and the lexical retriever the ``rag`` chain reads them with.

``load_documents`` reads ``<region_dir>/*.md`` synchronously; the app calls it once at
startup through ``asyncio.to_thread`` so the event loop never waits on the disk. Each
markdown file is cut into sections (one per ``##`` heading), because a section is the size
of passage a short answer can quote.

``LexicalRetriever`` scores sections with Okapi BM25 (Robertson and Zaragoza, "The
Probabilistic Relevance Framework: BM25 and Beyond", 2009; ``k1 = 1.5``, ``b = 0.75``, the
Lucene-style IDF ``ln(1 + (N - n + 0.5) / (n + 0.5))`` that stays positive). It returns up
to ``k`` sections that share a term with the query; when none does, the first ``k``
sections (each file's opening), so a region with documents always gives context and
``/health`` can tell "no documents" from "no match".
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr

from backend.settings import StartupError
from backend.text import terms

__all__ = ["LexicalRetriever", "load_documents", "split_sections"]

_SECTION = re.compile(r"^(?=##\s)", re.MULTILINE)
_H1 = re.compile(r"^#\s+(.+)$", re.MULTILINE)


def split_sections(text: str, *, source: str, region: str) -> list[Document]:
    """Cut one markdown document into sections at its ``##`` headings.

    Args:
        text: the markdown text.
        source: file name, kept in ``metadata["source"]``.
        region: region name, kept in ``metadata["region"]``.

    Returns:
        One Document per non-empty section (the part before the first ``##`` included),
        its text prefixed with the document's ``#`` title line so that title words count
        when scoring; ``metadata`` holds ``source``, ``region``, ``title`` (the ``#`` heading) and
        ``section`` (the ``##`` heading, or ``""``).
    """
    title_match = _H1.search(text)
    title = title_match.group(1).strip() if title_match else source
    docs: list[Document] = []
    for part in _SECTION.split(text):
        body = _H1.sub("", part).strip()
        if not body:
            continue
        heading = body.splitlines()[0][2:].strip() if body.startswith("##") else ""
        if heading and body.count("\n") == 0:
            continue  # a heading with no text under it
        meta = {"source": source, "region": region, "title": title, "section": heading}
        docs.append(Document(page_content=f"# {title}\n{body}", metadata=meta))
    return docs


def load_documents(region_dir: Path, *, region: str) -> list[Document]:
    """Read and section every ``*.md`` file of ``region_dir``, in file-name order (blocking).

    Args:
        region_dir: the region's folder, e.g. ``backend/data/eu-west-1``.
        region: region name recorded in each Document's metadata.

    Returns:
        The sections of all files; empty when the folder holds no markdown.

    Raises:
        StartupError: ``region_dir`` does not exist or is not a folder (the message names it).
    """
    if not region_dir.is_dir():
        raise StartupError(
            f"no documents for region {region!r}: {region_dir} is not a directory "
            f"(expected {region_dir}/*.md)"
        )
    docs: list[Document] = []
    for path in sorted(region_dir.glob("*.md")):
        docs.extend(split_sections(path.read_text("utf-8"), source=path.name, region=region))
    return docs


class LexicalRetriever(BaseRetriever):
    """BM25 over a fixed list of Documents, indexed once at construction.

    Args:
        documents: the corpus; may be empty (then every query returns ``[]``).
        k: how many Documents a query returns at most (the first ``k`` when none matches).
        k1: BM25 term-frequency saturation.
        b: BM25 length normalisation.

    Ties keep corpus order, so the same query always gives the same Documents.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    documents: list[Document] = Field(default_factory=list)
    k: int = 3
    k1: float = 1.5
    b: float = 0.75

    _doc_terms: list[Counter[str]] = PrivateAttr(default_factory=list)
    _doc_len: list[int] = PrivateAttr(default_factory=list)
    _idf: dict[str, float] = PrivateAttr(default_factory=dict)
    _avg_len: float = PrivateAttr(default=0.0)

    def model_post_init(self, context: object, /) -> None:
        """Build the term index (term counts, lengths, IDF) once."""
        self._doc_terms = [Counter(terms(doc.page_content)) for doc in self.documents]
        self._doc_len = [sum(c.values()) for c in self._doc_terms]
        n_docs = len(self.documents)
        self._avg_len = (sum(self._doc_len) / n_docs) if n_docs else 0.0
        doc_freq: Counter[str] = Counter()
        for counts in self._doc_terms:
            doc_freq.update(counts.keys())
        self._idf = {
            term: math.log(1.0 + (n_docs - n + 0.5) / (n + 0.5)) for term, n in doc_freq.items()
        }

    def scores(self, query: str) -> list[float]:
        """Return the BM25 score of every Document for ``query``, in corpus order.

        Args:
            query: free text; stop words are ignored.

        Returns:
            One float per Document, 0.0 where no query term occurs.
        """
        query_terms = set(terms(query))
        out: list[float] = []
        for counts, length in zip(self._doc_terms, self._doc_len, strict=True):
            score = 0.0
            norm = self.k1 * (1.0 - self.b + self.b * length / (self._avg_len or 1.0))
            for term in query_terms:
                tf = counts.get(term)
                if tf:
                    score += self._idf[term] * tf * (self.k1 + 1.0) / (tf + norm)
            out.append(score)
        return out

    def top(self, query: str) -> list[Document]:
        """Return up to ``k`` Documents for ``query``.

        Args:
            query: free text.

        Returns:
            Matching Documents best first (ties in corpus order); when nothing matches, the
            first ``k`` Documents; ``[]`` only for an empty corpus.
        """
        ranked: Sequence[tuple[float, int]] = sorted(
            (-score, i) for i, score in enumerate(self.scores(query)) if score > 0.0
        )
        if not ranked:
            return self.documents[: self.k]
        return [self.documents[i] for _, i in ranked[: self.k]]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return self.top(query)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        # Scoring a few dozen sections takes microseconds: no thread hop needed.
        return self.top(query)
