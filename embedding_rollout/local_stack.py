"""The local stack on one machine: model server and app, bootstrapped with v1 on first start."""
from __future__ import annotations

import dataclasses
import logging

from .auth import ensure_tokens_file
from .config import Settings
from .domain.versions import parse_version
from .generator.models import ModelManager, available_versions
from .generator.server import ModelServer
from .model.trainer import TrainConfig
from .model.training import train_version
from . import steps

log = logging.getLogger(__name__)

FIRST_VERSION = "v1"
FIRST_VERSION_UNTIL = "2019-01-01"  # v1 knows the corpus up to 2018; a retrain sees newer data
FIRST_VERSION_DIMS = 64


class LocalStack:
    def __init__(self, settings: Settings, host: str = "127.0.0.1", app_port: int = 8080,
                 rest_port: int = 8501, grpc_port: int = 8500):
        self.host, self.app_port = host, app_port
        self.settings = dataclasses.replace(settings, generator_grpc=f"{host}:{grpc_port}",
                                            generator_rest=f"http://{host}:{rest_port}")
        self.model_server: ModelServer | None = None
        self.app_server = None
        self.tokens_created = False

    def start(self) -> "LocalStack":
        settings = self.settings
        self.tokens_created = ensure_tokens_file(settings.tokens_path)  # before anything can be called
        if parse_version(FIRST_VERSION) not in available_versions(settings.model_dir):
            log.info("no model yet: training %s", FIRST_VERSION)
            train_version(settings.model_dir, parse_version(FIRST_VERSION),
                          TrainConfig(dims=FIRST_VERSION_DIMS), until=FIRST_VERSION_UNTIL)
        self._start_model_server()
        if not steps.state_file(settings).read().weights:
            self.bootstrap()
        from serving_app import AppServer, create_app
        self.app_server = AppServer(create_app(settings), self.host, self.app_port).start()
        return self

    def _start_model_server(self) -> None:
        settings = self.settings
        manager = ModelManager(settings.model_name, settings.model_dir)
        deployed = [v.number for v in steps.state_file(settings).read().versions.values()]
        manager.serve(deployed or [parse_version(FIRST_VERSION)])
        rest_port = int(settings.generator_rest.rsplit(":", 1)[1])
        grpc_port = int(settings.generator_grpc.rsplit(":", 1)[1])
        self.model_server = ModelServer(manager, self.host, rest_port, grpc_port).start()

    def bootstrap(self) -> None:
        """First start: v1 deployed, the corpus indexed, all traffic and writes to v1."""
        steps.bootstrap(self.settings, FIRST_VERSION)

    @property
    def state(self):
        return steps.state_file(self.settings)

    @property
    def app_url(self) -> str:
        return self.app_server.url

    @property
    def rest_url(self) -> str:
        return self.settings.generator_rest

    @property
    def grpc_address(self) -> str:
        return self.settings.generator_grpc

    def stop(self) -> None:
        if self.app_server:
            self.app_server.stop()
        if self.model_server:
            self.model_server.stop()
