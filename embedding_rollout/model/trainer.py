"""Train a small text encoder and export it into a TF Serving model repository.

The encoder is TextVectorization → Embedding → masked mean pooling → Dense → L2 norm. It is trained
contrastively on (title, body) pairs of the corpus with in-batch negatives, so that a short query
lands near the documents it describes. The SavedModel's ``serving_default`` signature maps a string
tensor ``text`` to a float tensor ``embedding`` of unit length, the contract TF Serving and the
project's own model server share.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

log = logging.getLogger(__name__)

from .signature import INPUT_KEY, OUTPUT_KEY, SIGNATURE  # noqa: E402,F401 (re-exported)


@dataclass(frozen=True)
class TrainConfig:
    dims: int = 64
    vocab_size: int = 30_000
    sequence_length: int = 96
    token_dims: int = 128
    epochs: int = 4
    batch_size: int = 128
    learning_rate: float = 3e-3
    temperature: float = 0.05
    seed: int = 7


class MaskedMean(keras.layers.Layer):
    """Mean of the token vectors, ignoring padding; zero (not NaN) for a text with no tokens."""

    def call(self, embedded, tokens):
        mask = keras.ops.expand_dims(keras.ops.cast(keras.ops.not_equal(tokens, 0), embedded.dtype), -1)
        total = keras.ops.sum(embedded * mask, axis=1)
        return total / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0)


def _pooling_encoder(vectorizer: keras.layers.TextVectorization, cfg: TrainConfig) -> keras.Model:
    text = keras.Input(shape=(), dtype="string", name=INPUT_KEY)
    tokens = vectorizer(text)
    embedded = keras.layers.Embedding(cfg.vocab_size, cfg.token_dims, name="tokens")(tokens)
    # The projection's bias keeps the vector of an empty text non-zero (cosine needs a norm).
    pooled = MaskedMean(name="mean_pool")(embedded, tokens)
    projected = keras.layers.Dense(cfg.dims, name="projection")(pooled)
    normalised = keras.layers.UnitNormalization(name="l2_norm")(projected)
    return keras.Model(text, normalised, name="text_encoder")


def split_identifiers(text: tf.Tensor) -> tf.Tensor:
    """Lower-case and turn punctuation into spaces: ``bytes.hex()`` → ``bytes hex``.

    Keras' default strips punctuation without a space (``byteshex``), which loses the API names
    that changelog entries and queries share.
    """
    return tf.strings.regex_replace(tf.strings.lower(text), r"[^a-z0-9_]+", " ")


def build_encoder(texts: Sequence[str], cfg: TrainConfig) -> keras.Model:
    vectorizer = keras.layers.TextVectorization(
        max_tokens=cfg.vocab_size, output_sequence_length=cfg.sequence_length,
        standardize=split_identifiers, name="vectorize")
    vectorizer.adapt(tf.data.Dataset.from_tensor_slices(list(texts)).batch(512))
    return _pooling_encoder(vectorizer, cfg)


def train_encoder(pairs: Sequence[tuple[str, str]], cfg: TrainConfig) -> keras.Model:
    """Fit the encoder so each pair's two texts are nearer each other than to the batch's others."""
    keras.utils.set_random_seed(cfg.seed)
    queries = [q for q, _ in pairs]
    bodies = [b for _, b in pairs]
    encoder = build_encoder(queries + bodies, cfg)
    optimizer = keras.optimizers.Adam(cfg.learning_rate)
    data = (tf.data.Dataset.from_tensor_slices((queries, bodies))
            .shuffle(len(pairs), seed=cfg.seed).batch(cfg.batch_size, drop_remainder=True))

    @tf.function
    def step(q, b):
        with tf.GradientTape() as tape:
            eq, eb = encoder(q, training=True), encoder(b, training=True)
            logits = tf.matmul(eq, eb, transpose_b=True) / cfg.temperature
            labels = tf.range(tf.shape(q)[0])
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                + keras.losses.sparse_categorical_crossentropy(labels, tf.transpose(logits), from_logits=True))
        grads = tape.gradient(loss, encoder.trainable_variables)
        optimizer.apply_gradients(zip(grads, encoder.trainable_variables))
        return loss

    for epoch in range(cfg.epochs):
        losses = [float(step(q, b)) for q, b in data]
        log.info("epoch %d/%d loss %.4f", epoch + 1, cfg.epochs, float(np.mean(losses)) if losses else float("nan"))
    return encoder


def export_saved_model(encoder: keras.Model, model_dir: Path, number: int, extra: dict | None = None) -> Path:
    """Write ``<model_dir>/<number>/`` atomically (TF Serving must never see half a version)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / str(number)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{number}-"))
    try:
        archive = keras.export.ExportArchive()
        archive.track(encoder)
        archive.add_endpoint(
            name=SIGNATURE,
            fn=lambda text: {OUTPUT_KEY: encoder(text)},
            input_signature=[tf.TensorSpec(shape=[None], dtype=tf.string, name=INPUT_KEY)])
        archive.write_out(str(staging), verbose=False)
        if extra:
            # assets.extra/ is TF Serving's place for files that travel with a version.
            (staging / "assets.extra").mkdir(exist_ok=True)
            (staging / "assets.extra" / "training.json").write_text(json.dumps(extra, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_evaluation(version_dir: Path, evaluation: dict) -> None:
    extra = version_dir / "assets.extra"
    extra.mkdir(exist_ok=True)
    (extra / "evaluation.json").write_text(json.dumps(evaluation, indent=2))


def training_metadata(cfg: TrainConfig, number: int, until: str | None, doc_count: int, started: float) -> dict:
    return {"version": number, "config": asdict(cfg), "trained_until": until,
            "documents": doc_count, "seconds": round(time.time() - started, 1)}
