"""The generators running, one per model version: start one (make-before-break) or stop one.

Two fleets behind one small interface, chosen by ``ER_GENERATOR_BACKEND``:

- ``model-server``: one model server (the project's, or ``tensorflow/serving`` in Compose) told
  which versions to serve with ``HandleReloadConfigRequest``;
- ``kubernetes``: one TF Serving Deployment per version from ``k8s/generator-version-template``,
  routed by Istio (:mod:`.kubernetes`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..config import Settings
from ..domain.versions import parse_version


class GeneratorFleet(Protocol):
    def deploy(self, version: str) -> None:
        """Serve ``version`` next to the others; return once it answers AVAILABLE. Idempotent."""

    def remove(self, version: str) -> None:
        """Stop serving ``version``; the others are untouched. Idempotent."""


class ModelServerFleet:
    """Every version in one model server."""

    def __init__(self, admin):
        self.admin = admin

    def deploy(self, version: str) -> None:
        self.admin.load(parse_version(version))

    def remove(self, version: str) -> None:
        number = parse_version(version)
        if number in self.admin.served():
            self.admin.unload(number)


def model_server_admin(settings: Settings):
    from .admin import ModelServerAdmin
    serving_path = str(Path(settings.serving_model_path or settings.model_dir))
    return ModelServerAdmin(settings.generator_grpc, settings.model_name, serving_path,
                            lock_path=settings.home / "locks" / "model-server.lock")


def generator_fleet(settings: Settings) -> GeneratorFleet:
    if settings.generator_backend == "kubernetes":
        from .kubernetes import KubernetesFleet
        # The admin client (TF Serving's protos, hence TensorFlow) only when a deploy confirms:
        # a step that removes a version starts without that import.
        return KubernetesFleet(settings.k8s_namespace, settings.generator_template,
                               confirm=lambda version: model_server_admin(settings).wait_available(
                                   parse_version(version)),
                               timeout=settings.generator_deploy_timeout)
    if settings.generator_backend == "model-server":
        return ModelServerFleet(model_server_admin(settings))
    raise ValueError(f"ER_GENERATOR_BACKEND must be 'model-server' or 'kubernetes', got {settings.generator_backend!r}")
