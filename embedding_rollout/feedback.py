"""Feedback that cannot be forged: each search answer carries a signed reference, and a reference
counts once, for the version that served that search.

A reference is a compact HS256 JWT signed with the deployment's feedback key: the serving version
(``ver``), the user key if there was one (``usr``), when (``iat``), until when (``exp``) and a
random id (``jti``). The ledger remembers which ids were counted, until they expire: SQLite under
``ER_HOME`` (one machine, any number of app processes), or an index of the Elasticsearch store
(every app pod of a cluster), written with ``op_type=create`` so that two pods cannot both count
the same id.
"""
from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

log = logging.getLogger(__name__)
ALGORITHM = "HS256"
PRUNE_EVERY = 600.0  # seconds between deletions of expired ids


class InvalidReference(ValueError):
    """Forged, altered, expired or not a reference at all (400)."""


class AlreadyCounted(ValueError):
    """This search's feedback was counted before (409)."""


@dataclass(frozen=True)
class Reference:
    id: str
    version: str
    user: str | None
    issued_at: float
    expires_at: float


class FeedbackReferences:
    def __init__(self, key: bytes, ttl: float = 3600.0):
        if len(key) < 16:
            raise ValueError("the feedback key must have at least 16 bytes")
        self.key, self.ttl = key, ttl

    def issue(self, version: str, user: str | None = None, now: float | None = None) -> str:
        now = time.time() if now is None else now
        claims = {"ver": version, "iat": int(now), "exp": int(now + self.ttl), "jti": secrets.token_urlsafe(12)}
        if user:
            claims["usr"] = user
        return jwt.encode(claims, self.key, algorithm=ALGORITHM)

    def verify(self, reference: str) -> Reference:
        try:
            claims = jwt.decode(reference, self.key, algorithms=[ALGORITHM],
                                options={"require": ["ver", "iat", "exp", "jti"]})
        except jwt.ExpiredSignatureError as exc:
            raise InvalidReference("the feedback reference has expired") from exc
        except jwt.PyJWTError as exc:
            raise InvalidReference(f"not a feedback reference of this deployment: {exc}") from exc
        if not (isinstance(claims["ver"], str) and isinstance(claims["jti"], str)):
            raise InvalidReference("not a feedback reference of this deployment: malformed claims")
        return Reference(claims["jti"], claims["ver"], claims.get("usr"), float(claims["iat"]), float(claims["exp"]))


class SqliteLedger:
    """Opened at the first feedback: an app that gets none leaves no file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local, self._pruned = threading.local(), 0.0

    def _connection(self) -> sqlite3.Connection:
        if getattr(self._local, "db", None) is None:  # one per thread: the server's worker threads
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")  # app processes sharing it do not block each other's reads
            db.execute("CREATE TABLE IF NOT EXISTS counted (id TEXT PRIMARY KEY, expires_at REAL NOT NULL)")
            self._local.db = db
        return self._local.db

    def count_once(self, reference: Reference) -> None:
        db, now = self._connection(), time.time()
        if now - self._pruned > PRUNE_EVERY:
            self._pruned = now
            db.execute("DELETE FROM counted WHERE expires_at < ?", (now,))
        inserted = db.execute("INSERT OR IGNORE INTO counted (id, expires_at) VALUES (?, ?)",
                              (reference.id, reference.expires_at)).rowcount
        if not inserted:
            raise AlreadyCounted(f"feedback for this search ({reference.version}) was counted already")


class ElasticsearchLedger:
    def __init__(self, client, index: str, replicas: int = 0):
        self.client, self.index, self.replicas, self._pruned, self._created = client, index, replicas, 0.0, False

    def _ensure_index(self) -> None:
        from elasticsearch import BadRequestError
        if self._created:
            return
        try:  # hidden: not matched by a wildcard that means the versions' indices
            self.client.indices.create(index=self.index, settings={"index.hidden": True,
                                                                   "number_of_replicas": self.replicas},
                                       mappings={"dynamic": "strict", "properties": {
                                           "expires_at": {"type": "double"}, "version": {"type": "keyword"}}})
        except BadRequestError as exc:
            if exc.error != "resource_already_exists_exception":
                raise
        self._created = True

    def count_once(self, reference: Reference) -> None:
        from elasticsearch import ConflictError
        self._ensure_index()
        now = time.time()
        if now - self._pruned > PRUNE_EVERY:
            self._pruned = now
            try:
                self.prune(now)
            except Exception as exc:  # pruning is housekeeping: counting goes on
                log.warning("expired feedback ids not pruned from %s: %s", self.index, exc)
        try:
            self.client.index(index=self.index, id=reference.id, op_type="create",
                              document={"expires_at": reference.expires_at, "version": reference.version})
        except ConflictError as exc:
            raise AlreadyCounted(f"feedback for this search ({reference.version}) was counted already") from exc

    def prune(self, now: float) -> int:
        """Delete the ids expired before ``now`` (their references are refused as expired anyway).
        A scan and bulk deletes, not ``_delete_by_query``: that needs the reindex module, which
        not every distribution ships."""
        from elasticsearch import helpers
        if not self.client.indices.exists(index=self.index):
            return 0
        self.client.indices.refresh(index=self.index)  # the latest ids too (every PRUNE_EVERY: cheap)
        expired = helpers.scan(self.client, index=self.index, _source=False,
                               query={"query": {"range": {"expires_at": {"lt": now}}}})
        actions = ({"_op_type": "delete", "_index": self.index, "_id": hit["_id"]} for hit in expired)
        deleted, _ = helpers.bulk(self.client, actions, raise_on_error=False, refresh=True)
        return deleted


def open_ledger(settings, store) -> SqliteLedger | ElasticsearchLedger:
    if settings.store == "elasticsearch":
        return ElasticsearchLedger(store.client, f"{settings.index_prefix}-feedback-counted", settings.es_replicas)
    return SqliteLedger(settings.feedback_ledger_path)
