"""The search application: Flask + Connexion, OpenAPI first (``openapi.yaml``), app factory style."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import connexion
import uvicorn
import yaml
from connexion.jsonifier import Jsonifier
from connexion.middleware import MiddlewarePosition

from embedding_rollout.auth import feedback_key, verifier_from_settings
from embedding_rollout.config import Settings
from embedding_rollout.feedback import FeedbackReferences, open_ledger
from embedding_rollout.service import EmbeddingService
from embedding_rollout.statestore import ConfigMapDecisionLog, DecisionLog, open_decisions, open_state
from embedding_rollout.store import open_store

from .guards import RequestBodyGuard
from .metrics import AppMetrics
from .security import security_map

HERE = Path(__file__).parent
APIS = {"public": "openapi.yaml", "operator": "operator.yaml"}


@dataclass
class AppContext:
    service: EmbeddingService
    metrics: AppMetrics
    decisions: DecisionLog | ConfigMapDecisionLog
    settings: Settings
    references: FeedbackReferences
    ledger: object  # feedback.SqliteLedger | feedback.ElasticsearchLedger


def specification(settings: Settings) -> dict:
    """The served OpenAPI document: the public API (openapi.yaml, which holds the shared
    components) and the operator API (operator.yaml), as ``ER_APP_APIS`` selects; ``/search``
    without security when ``ER_SEARCH_AUTH=public``."""
    chosen = [name.strip() for name in settings.apis.split(",") if name.strip()]
    unknown = sorted(set(chosen) - APIS.keys())
    if unknown or not chosen:
        raise ValueError(f"ER_APP_APIS: expected a comma-separated subset of {sorted(APIS)}, got {settings.apis!r}")
    if settings.search_auth not in ("public", "token"):
        raise ValueError(f"ER_SEARCH_AUTH must be 'public' or 'token', got {settings.search_auth!r}")
    spec = yaml.safe_load((HERE / APIS["public"]).read_text())
    operator = yaml.safe_load((HERE / APIS["operator"]).read_text())
    spec["components"]["schemas"].update(operator["components"]["schemas"])
    public_paths = spec["paths"]
    spec["paths"] = {}
    if "public" in chosen:
        spec["paths"].update(public_paths)
    else:  # probes and metrics are served by every process
        spec["paths"].update({p: public_paths[p] for p in ("/healthz", "/readyz", "/metrics")})
    if "operator" in chosen:
        spec["paths"].update(operator["paths"])
    if settings.search_auth == "public" and "/search" in spec["paths"]:
        spec["paths"]["/search"]["post"]["security"] = []
    return spec


def create_app(settings: Settings | None = None, service: EmbeddingService | None = None,
               decisions: DecisionLog | ConfigMapDecisionLog | None = None) -> connexion.FlaskApp:
    """Build the app; ``service`` replaces the one the settings describe (tests, embedding)."""
    settings = settings or Settings()
    if service is None:
        service = EmbeddingService(open_state(settings, watch=True), open_store(settings),
                                   protocol=settings.generator_protocol, timeout=settings.generator_timeout)
    decisions = decisions or open_decisions(settings, state=service.state_file)
    # Compact JSON: Connexion's default indents, which makes json use its pure-Python encoder
    # (docs/benchmarks.md: 0.1-0.6 ms a search, answers ~14 % larger).
    app = connexion.FlaskApp(__name__, specification_dir=str(HERE), jsonifier=Jsonifier(json),
                             security_map=security_map(verifier_from_settings(settings)))
    app.add_api(specification(settings), strict_validation=True, validate_responses=False)
    app.add_middleware(RequestBodyGuard, position=MiddlewarePosition.BEFORE_EXCEPTION)
    references = FeedbackReferences(feedback_key(settings), settings.feedback_ttl)
    app.app.extensions["embedding_rollout"] = AppContext(service, AppMetrics(), decisions, settings, references,
                                                         open_ledger(settings, service.store))
    return app


class AppServer:
    """Run the app (or any ASGI app) under uvicorn in a background thread (tests, the local stack)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="app", daemon=True)

    def start(self, timeout: float = 30.0) -> "AppServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the app server did not start")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
