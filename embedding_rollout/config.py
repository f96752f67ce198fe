"""Settings from the environment (``ER_*``), so the same code runs locally, in Compose and in pods."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: Path(_env("ER_HOME", ".rollout")).resolve())
    model_name: str = field(default_factory=lambda: _env("ER_MODEL_NAME", "embedder"))
    store: str = field(default_factory=lambda: _env("ER_STORE", "lance"))  # lance | elasticsearch
    es_url: str = field(default_factory=lambda: _env("ER_ES_URL", "http://127.0.0.1:9200"))
    # Per version's index: a number, or `auto` (one shard per 10 M documents of the version it
    # replaces); replicas >= 1 in any cluster with more than one node (the prod overlay), 0 on a
    # single node (local, tests).
    es_shards: str = field(default_factory=lambda: _env("ER_ES_SHARDS", "auto"))
    es_replicas: int = field(default_factory=lambda: int(_env("ER_ES_REPLICAS", "0")))
    index_prefix: str = field(default_factory=lambda: _env("ER_INDEX_PREFIX", "docs"))
    generator_grpc: str = field(default_factory=lambda: _env("ER_GENERATOR_GRPC", "127.0.0.1:8500"))
    generator_rest: str = field(default_factory=lambda: _env("ER_GENERATOR_REST", "http://127.0.0.1:8501"))
    generator_protocol: str = field(default_factory=lambda: _env("ER_GENERATOR_PROTOCOL", "grpc"))
    generator_timeout: float = field(default_factory=lambda: float(_env("ER_GENERATOR_TIMEOUT", "2.0")))
    store_timeout: float = field(default_factory=lambda: float(_env("ER_STORE_TIMEOUT", "2.0")))
    # model-server: one server told what to serve; kubernetes: a TF Serving Deployment per version.
    generator_backend: str = field(default_factory=lambda: _env("ER_GENERATOR_BACKEND", "model-server"))
    k8s_namespace: str = field(default_factory=lambda: _env("ER_K8S_NAMESPACE", "embeddings"))
    # How long a new version's generator Deployment may take to become available (kubernetes).
    generator_deploy_timeout: float = field(default_factory=lambda: float(_env("ER_GENERATOR_DEPLOY_TIMEOUT", "900")))
    # file: the state file under ER_HOME; kubernetes: a ConfigMap in ER_K8S_NAMESPACE.
    state_backend: str = field(default_factory=lambda: _env("ER_STATE_BACKEND", "file"))
    state_configmap: str = field(default_factory=lambda: _env("ER_STATE_CONFIGMAP", "embedding-rollout-state"))
    # Who may call what (embedding_rollout.auth): `search` public or needing a token; JWTs from an
    # issuer when its JWKS URL is set (the cluster); static tokens from the token file otherwise too.
    search_auth: str = field(default_factory=lambda: _env("ER_SEARCH_AUTH", "public"))  # public | token
    jwt_issuer: str = field(default_factory=lambda: _env("ER_JWT_ISSUER", ""))
    jwt_jwks_url: str = field(default_factory=lambda: _env("ER_JWT_JWKS_URL", ""))
    jwt_audience: str = field(default_factory=lambda: _env("ER_JWT_AUDIENCE", "embedding-rollout"))
    jwt_subject_scopes: str = field(default_factory=lambda: _env("ER_JWT_SUBJECT_SCOPES", ""))
    jwt_ca_file: str = field(default_factory=lambda: _env("ER_JWT_CA_FILE", ""))
    jwt_jwks_token_file: str = field(default_factory=lambda: _env("ER_JWT_JWKS_TOKEN_FILE", ""))
    # Feedback references: their signing key (else the token file's) and how long they are valid.
    feedback_key: str = field(default_factory=lambda: _env("ER_FEEDBACK_KEY", ""))
    feedback_ttl: float = field(default_factory=lambda: float(_env("ER_FEEDBACK_TTL", "3600")))
    # Which APIs this app process serves: public (search, documents, feedback) and operator.
    apis: str = field(default_factory=lambda: _env("ER_APP_APIS", "public,operator"))
    generator_template: Path = field(default_factory=lambda: Path(_env("ER_GENERATOR_TEMPLATE", str(
        Path(__file__).resolve().parent.parent / "k8s" / "generator-version-template"))))
    # LanceDB: a table this large after a bulk load gets an approximate vector index (rows).
    lance_ann_threshold: int = field(default_factory=lambda: int(_env("ER_LANCE_ANN_THRESHOLD", "100000")))
    # LanceDB: MiB for each of its index and metadata caches per process; 0 keeps Lance's own
    # defaults (6 GiB for indices, 1 GiB for metadata).
    lance_cache_mib: int = field(default_factory=lambda: int(_env("ER_LANCE_CACHE_MIB", "0")))
    # LanceDB: a table whose live rows take at most this many MiB is searched from a copy in each
    # searching process's memory (0: always through Lance's own search).
    lance_memory_search_mib: int = field(default_factory=lambda: int(_env("ER_LANCE_MEMORY_SEARCH_MIB", "64")))

    @property
    def drain_seconds(self) -> float:
        """How long a removed version's index and generator outlive its last routing: by default
        the longest a request that read the state just before may take (a generator call, then a
        store call, each bounded by its timeout)."""
        return float(_env("ER_DRAIN_SECONDS", str(self.generator_timeout + self.store_timeout)))

    @property
    def serving_model_path(self) -> str | None:
        """The model's path as the model server sees it (differs inside a TF Serving container)."""
        return os.environ.get("ER_SERVING_MODEL_PATH")

    @property
    def model_base(self) -> Path:
        """TF Serving model base path: ``<base>/<model_name>/<n>/saved_model.pb``."""
        return Path(_env("ER_MODEL_BASE", str(self.home / "models")))

    @property
    def model_dir(self) -> Path:
        return self.model_base / self.model_name

    @property
    def state_path(self) -> Path:
        return Path(_env("ER_STATE", str(self.home / "state.json")))

    @property
    def decisions_path(self) -> Path:
        """A/B rollout decisions received by the app (JSON lines)."""
        return Path(_env("ER_DECISIONS", str(self.home / "decisions.jsonl")))

    @property
    def tokens_path(self) -> Path:
        """The static tokens (mode 0600): one per caller, with its scopes; the feedback key."""
        return Path(_env("ER_TOKENS", str(self.home / "tokens.json")))

    @property
    def feedback_ledger_path(self) -> Path:
        """Which feedback references were counted (SQLite; the Elasticsearch store keeps an index)."""
        return Path(_env("ER_FEEDBACK_LEDGER", str(self.home / "feedback.sqlite")))

    @property
    def lance_uri(self) -> str:
        return _env("ER_LANCE_URI", str(self.home / "lancedb"))

    def index_name(self, version: str) -> str:
        return f"{self.index_prefix}-{version}"
