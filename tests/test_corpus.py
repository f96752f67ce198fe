"""The committed corpus snapshot and its loader."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter
from datetime import date
from pathlib import Path

import pytest

from embedding_rollout import corpus
from embedding_rollout.corpus import Document, Query

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return list(corpus.load_documents())


@pytest.fixture(scope="module")
def queries() -> list[Query]:
    return corpus.load_queries()


def test_at_least_ten_thousand_documents_with_unique_ids(docs):
    assert len(docs) >= 10_000
    assert len({d.id for d in docs}) == len(docs)


def test_documents_are_nonempty_and_trimmed(docs):
    for d in docs:
        assert d.id and d.title.strip() and d.text.strip() and d.category
        assert len(d.text) <= 1500
        assert d.title.removesuffix(" …") in d.embedding_text()
        assert d.text in d.embedding_text()


def test_dates_parse_and_span_several_years(docs):
    parsed = [date.fromisoformat(d.date) for d in docs]
    assert all(len(d.date) == 10 for d in docs)
    assert max(parsed).year - min(parsed).year >= 3
    assert len({p.year for p in parsed}) >= 4


def test_category_count_in_range(docs):
    cats = corpus.categories(docs)
    assert 5 <= len(cats) <= 40
    assert cats == sorted(cats)
    # no category is a trivial sliver or the whole corpus
    counts = Counter(d.category for d in docs)
    assert max(counts.values()) < 0.6 * len(docs)


def test_queries_reference_existing_documents(docs, queries):
    ids = {d.id for d in docs}
    assert len(queries) >= 300
    assert len({q.id for q in queries}) == len(queries)
    for q in queries:
        assert q.query.strip() and q.relevant
        assert set(q.relevant) <= ids, q


def test_queries_are_not_copies_of_their_documents(docs, queries):
    by_id = {d.id: d for d in docs}
    for q in queries:
        for r in q.relevant:
            assert q.query.strip() != by_id[r].text.strip()
            assert q.query.strip() != by_id[r].title.strip()


def test_queries_cover_the_date_range(docs, queries):
    by_id = {d.id: d for d in docs}
    years = Counter(by_id[q.relevant[0]].date[:4] for q in queries)
    assert len(years) >= 5


def test_loader_is_deterministic(docs):
    again = list(corpus.load_documents())
    assert again == docs
    assert [q for q in corpus.load_queries()] == corpus.load_queries()


def test_split_by_date(docs):
    before, after = corpus.split_by_date(docs, "2019-01-01")
    assert before and after and len(before) + len(after) == len(docs)
    assert all(d.date < "2019-01-01" for d in before)
    assert all(d.date >= "2019-01-01" for d in after)
    with pytest.raises(ValueError):
        corpus.split_by_date(docs, "not-a-date")


def test_env_override_and_explicit_path(tmp_path, monkeypatch):
    rows = [{"id": "a", "title": "T.", "text": "T. More.", "category": "X", "date": "2020-01-02"}]
    p = tmp_path / "c.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("ER_CORPUS", str(p))
    (doc,) = corpus.load_documents()
    assert doc == Document("a", "T.", "T. More.", "X", "2020-01-02")
    assert doc.embedding_text() == "T. More."
    assert Document("b", "Head", "Body", "X", "2020-01-02").embedding_text() == "Head\nBody"
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "q1", "query": "t", "relevant": ["a"]}) + "\n")
    assert corpus.load_queries(q) == [Query("q1", "t", ("a",))]


def test_recall_at_k():
    qs = [Query("q1", "x", ("a", "b")), Query("q2", "y", ("c",))]
    assert corpus.recall_at_k({"q1": ["a", "z"], "q2": ["c"]}, qs, k=10) == pytest.approx(0.75)
    assert corpus.recall_at_k({"q1": ["z", "a"]}, qs, k=1) == 0.0


def test_build_script_is_importable_and_pure_stdlib():
    # The builder must not need anything beyond the standard library.
    out = subprocess.run(
        [sys.executable, "-I", "-c",
         "import sys, runpy; sys.argv=['x','--help']; runpy.run_path('scripts/build_corpus.py', run_name='__main__')"],
        cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--deb" in out.stdout


# -- a corpus of any size ------------------------------------------------------------------------
def _synth(tmp_path: Path, documents: int, seed: int) -> tuple[Path, list[Document]]:
    path = tmp_path / f"synth-{documents}-{seed}.jsonl.gz"
    done = subprocess.run([sys.executable, "-m", "embedding_rollout.cli", "corpus", "synth", "--documents",
                           str(documents), "--seed", str(seed), "--output", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{documents} documents in {path}" in done.stdout
    return path, list(corpus.load_documents(path))


def test_a_synthetic_corpus_is_the_real_one_then_seeded_variations_of_it(docs, tmp_path):
    import hashlib
    import re
    size = 2 * len(docs) + 1234
    path, synth = _synth(tmp_path, size, seed=7)
    assert len(synth) == size and len({d.id for d in synth}) == size
    assert synth[:len(docs)] == docs  # the real documents first, unchanged
    assert all(re.fullmatch(r"[A-Za-z0-9._:~-]{1,128}", d.id) for d in synth)  # the API's id pattern
    real = {d.id: d for d in docs}
    for doc in synth[len(docs):]:
        original = real[doc.id.rsplit("~r", 1)[0]]
        assert doc.category == original.category and doc.title == original.title
        assert doc.text.startswith(original.text) and doc.text != original.text
        assert date.fromisoformat(doc.date).year == date.fromisoformat(original.date).year
        assert abs((date.fromisoformat(doc.date) - date.fromisoformat(original.date)).days) <= 30
    # Each round holds every real document once: the category mix is the corpus's.
    second = Counter(d.category for d in synth[len(docs):2 * len(docs)])
    assert second == Counter(d.category for d in docs)
    again, _ = _synth(tmp_path / "again", size, seed=7)
    other, differently = _synth(tmp_path / "other", size, seed=8)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(path)  # the same seed, the same bytes
    assert differently[:len(docs)] == docs and differently[len(docs):] != synth[len(docs):]


def test_a_synthetic_corpus_smaller_than_the_real_one_is_its_beginning(docs, tmp_path):
    _, synth = _synth(tmp_path, 500, seed=1)
    assert synth == docs[:500]
