"""Train one model version on a time window of the corpus, export it, evaluate it offline."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import tensorflow as tf

from ..corpus import Document, load_documents, load_queries
from .evaluation import evaluate
from .trainer import (INPUT_KEY, OUTPUT_KEY, SIGNATURE, TrainConfig, export_saved_model, train_encoder,
                      training_metadata, write_evaluation)

log = logging.getLogger(__name__)


def _drop_words(text: str, rng: random.Random, rate: float = 0.15) -> str:
    words = text.split()
    kept = [w for w in words if rng.random() >= rate]
    return " ".join(kept or words)


def training_pairs(docs: list[Document], seed: int, views: int = 2) -> list[tuple[str, str]]:
    """(query-like, document) pairs: the entry's summary line against its full text.

    Many entries are a single sentence, so both sides also lose random words: the model must
    match paraphrase-like views, not identical strings.
    """
    rng = random.Random(seed)
    return [(_drop_words(d.title, rng), _drop_words(d.embedding_text(), rng))
            for _ in range(views) for d in docs]


def saved_model_embedder(version_dir: Path):
    """An embed function over a SavedModel's serving signature (no server needed)."""
    signature = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE]
    return lambda texts: signature(**{INPUT_KEY: tf.constant(texts)})[OUTPUT_KEY].numpy()


def train_version(model_dir: Path, number: int, cfg: TrainConfig, until: str | None = None,
                  since: str | None = None) -> dict:
    """Train on documents dated in [``since``, ``until``) (open ends when None), export as
    ``<model_dir>/<number>``."""
    started = time.time()
    corpus = list(load_documents())
    window = [d for d in corpus if (until is None or d.date < until) and (since is None or d.date >= since)]
    if len(window) < cfg.batch_size:
        raise ValueError(f"only {len(window)} documents between {since} and {until}: too few to train on")
    log.info("training version %d on %d documents (until %s), dims %d", number, len(window), until, cfg.dims)
    encoder = train_encoder(training_pairs(window, cfg.seed), cfg)
    meta = {**training_metadata(cfg, number, until, len(window), started), "trained_since": since}
    version_dir = export_saved_model(encoder, model_dir, number, meta)
    evaluation = evaluate(saved_model_embedder(version_dir), corpus, load_queries())
    write_evaluation(version_dir, {**evaluation, "trained_until": until})
    log.info("version %d: %s = %.4f", number, evaluation["metric"], evaluation[evaluation["metric"]])
    return {"version": number, "path": str(version_dir), **meta, **evaluation}
