"""The project's corpus: CPython changelog entries (2015-2023) and What's New queries.

The snapshot lives in ``data/`` (built by ``scripts/build_corpus.py``; see ``data/README.md``).
``ER_CORPUS`` overrides the corpus file and ``ER_QUERIES`` the query file; both default to the
``data/`` folder next to the package.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date as _date, timedelta
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CORPUS_FILE = "corpus.jsonl.gz"
QUERIES_FILE = "queries.jsonl"


@dataclass(frozen=True, slots=True)
class Document:
    """One changelog entry. ``title`` is its first sentence, ``text`` the whole entry."""

    id: str
    title: str
    text: str
    category: str
    date: str  # ISO YYYY-MM-DD: the release date of the release that shipped the entry

    def embedding_text(self) -> str:
        """Title + text, what a model embeds (the title is not repeated when text starts with it)."""
        head = self.title.removesuffix(" …")
        if self.text.startswith(head):
            return self.text
        return f"{self.title}\n{self.text}"

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "title": self.title, "text": self.text,
                "category": self.category, "date": self.date}


@dataclass(frozen=True, slots=True)
class Query:
    """A search query and the ids of the documents that answer it."""

    id: str
    query: str
    relevant: tuple[str, ...]


def corpus_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The corpus file: ``path``, else ``$ER_CORPUS``, else ``data/corpus.jsonl.gz``."""
    return Path(path or os.environ.get("ER_CORPUS") or DATA_DIR / CORPUS_FILE)


def queries_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The query file: ``path``, else ``$ER_QUERIES``, else ``data/queries.jsonl``."""
    return Path(path or os.environ.get("ER_QUERIES") or DATA_DIR / QUERIES_FILE)


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def load_documents(path: str | os.PathLike[str] | None = None) -> Iterator[Document]:
    """Stream the documents, in file order (stable: sorted newest release first)."""
    with _open_text(corpus_path(path)) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                yield Document(id=r["id"], title=r["title"], text=r["text"],
                               category=r["category"], date=r["date"])


def load_queries(path: str | os.PathLike[str] | None = None) -> list[Query]:
    """All evaluation queries."""
    with _open_text(queries_path(path)) as f:
        return [Query(id=r["id"], query=r["query"], relevant=tuple(r["relevant"]))
                for r in map(json.loads, filter(str.strip, f))]


def categories(docs: Iterable[Document]) -> list[str]:
    """Distinct categories, sorted."""
    return sorted({d.category for d in docs})


def split_by_date(docs: Iterable[Document], until: str) -> tuple[list[Document], list[Document]]:
    """Split into (date < until, date >= until); ``until`` is ``YYYY-MM-DD``."""
    _date.fromisoformat(until)  # validate
    before: list[Document] = []
    after: list[Document] = []
    for d in docs:
        (before if d.date < until else after).append(d)
    return before, after


def recall_at_k(ranked: dict[str, list[str]], queries: Iterable[Query], k: int = 10) -> float:
    """Mean over queries of |top-k ∩ relevant| / |relevant|; ``ranked`` maps query id → doc ids."""
    scores = [len(set(ranked.get(q.id, [])[:k]) & set(q.relevant)) / len(q.relevant) for q in queries]
    return sum(scores) / len(scores) if scores else 0.0


# -- a corpus of any size ------------------------------------------------------------------------
def synthesize(documents: int, seed: int, source: str | os.PathLike[str] | None = None) -> Iterator[Document]:
    """``documents`` documents derived from the real corpus, the same for the same seed.

    The real documents come first, in file order (all of them once ``documents`` reaches the corpus
    size). Each further round takes every real document once more, in a seeded order, as a
    variation: the same category (so filters keep the real distribution), a date a few weeks off in
    the same year (so date filters select alike), and its text joined with the first sentence of
    another entry of that category (so embeddings stay in the corpus's language). The id is the
    real one with ``~rN`` appended: unique, and valid wherever an id is.
    """
    if documents < 0:
        raise ValueError(f"documents must be >= 0, got {documents}")
    base = list(load_documents(source))
    by_category: dict[str, list[Document]] = {}
    for doc in base:
        by_category.setdefault(doc.category, []).append(doc)
    yield from base[:documents]
    made, round_ = min(documents, len(base)), 0
    while made < documents:
        round_ += 1
        order = list(range(len(base)))
        random.Random(f"{seed}:order:{round_}").shuffle(order)
        for position in order[:documents - made]:
            yield _variation(base[position], by_category[base[position].category],
                             random.Random(f"{seed}:{round_}:{position}"), round_)
        made += min(len(order), documents - made)


def _variation(doc: Document, same_category: list[Document], rng: random.Random, round_: int) -> Document:
    other = rng.choice(same_category)
    day = _date.fromisoformat(doc.date)
    shifted = day + timedelta(days=rng.randint(-30, 30))
    if shifted.year != day.year:
        shifted = day
    addition = other.title.removesuffix(" …")
    return Document(id=f"{doc.id}~r{round_}", title=doc.title, text=f"{doc.text} {addition}",
                    category=doc.category, date=shifted.isoformat())


def write_corpus(docs: Iterable[Document], path: str | os.PathLike[str]) -> int:
    """Write ``docs`` as a corpus file (gzipped JSON lines when the name ends in .gz); their count."""
    path, count = Path(path), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw:
        # No name or time in the gzip header: the same documents give the same bytes.
        binary = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if path.suffix == ".gz" else raw
        with io.TextIOWrapper(binary, encoding="utf-8") as out:
            for doc in docs:
                out.write(json.dumps(doc.to_dict(), ensure_ascii=False) + "\n")
                count += 1
    return count
