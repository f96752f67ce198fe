"""Client of the embedding generator: TF Serving's gRPC API (default, ``grpc_client``) or its REST API.

Works unchanged against the ``tensorflow/serving`` image. Texts are sent in batches; transient
failures (unavailable server, connection errors, 503) are retried with exponential backoff inside
the call's time budget; every call carries ``x-model-version`` so a mesh can route on it.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import requests
from tenacity import (RetryError, Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay,
                      wait_exponential)

from ..domain.versions import parse_version
from ..model.signature import SIGNATURE

VERSION_HEADER = "x-model-version"
_STATE_NAMES = {0: "UNKNOWN", 10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}


class GeneratorError(RuntimeError):
    """The generator refused or failed the request (not worth retrying)."""


class GeneratorUnavailable(GeneratorError):
    """The generator could not be reached within the time budget."""


class _Transient(Exception):
    pass


@dataclass(frozen=True)
class GeneratorTarget:
    """Which generator to call: a model version at a gRPC and a REST address."""

    version: str
    grpc_address: str = "127.0.0.1:8500"
    rest_url: str = "http://127.0.0.1:8501"
    model_name: str = "embedder"


class _BaseClient:
    def __init__(self, target: GeneratorTarget, timeout: float = 2.0, batch_size: int = 64, attempts: int = 3):
        self.target = target
        self.number = parse_version(target.version)
        self.timeout = timeout
        self.batch_size = batch_size
        self.attempts = attempts

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors for ``texts``, one row each, computed by this client's model version."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        batches = [texts[i:i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        return np.vstack([self._retrying(self._predict, batch) for batch in batches])

    def status(self) -> str:
        """TF Serving state of this version (``AVAILABLE`` when it can serve)."""
        return self._retrying(self._status)

    def _retrying(self, call, *args):
        retrying = Retrying(
            retry=retry_if_exception_type(_Transient),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.timeout),
            wait=wait_exponential(multiplier=0.05, max=0.5), reraise=False)
        try:
            return retrying(call, *args)
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise GeneratorUnavailable(
                f"generator {self.target.version} unavailable after {exc.last_attempt.attempt_number} attempts: {cause}"
            ) from cause

    def _predict(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def _status(self) -> str:
        raise NotImplementedError


_channels: dict[str, grpc.Channel] = {}
_channels_lock = threading.Lock()


def _channel(address: str) -> grpc.Channel:
    with _channels_lock:
        if address not in _channels:
            _channels[address] = grpc.insecure_channel(address, options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30_000)])
        return _channels[address]


class RestGeneratorClient(_BaseClient):
    """``POST /v1/models/<name>/versions/<n>:predict`` and the status endpoint over HTTP."""

    def __init__(self, target: GeneratorTarget, **kwargs):
        super().__init__(target, **kwargs)
        self._session = requests.Session()
        self._session.headers[VERSION_HEADER] = target.version
        self._base = f"{target.rest_url.rstrip('/')}/v1/models/{target.model_name}/versions/{self.number}"

    def _request(self, method: str, url: str, **kwargs) -> dict:
        try:
            reply = self._session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.Timeout as exc:
            raise GeneratorUnavailable(f"generator {self.target.version} timed out after {self.timeout}s") from exc
        except requests.ConnectionError as exc:
            raise _Transient(str(exc)) from exc
        if reply.status_code in (502, 503, 504):
            raise _Transient(f"HTTP {reply.status_code}: {reply.text[:200]}")
        try:
            body = reply.json()
        except ValueError:
            body = {"error": reply.text[:200]}
        if reply.status_code != 200:
            raise GeneratorError(f"generator {self.target.version}: HTTP {reply.status_code}: {body.get('error')}")
        return body

    def _predict(self, texts: list[str]) -> np.ndarray:
        body = self._request("POST", f"{self._base}:predict",
                             json={"signature_name": SIGNATURE, "instances": texts})
        return np.asarray(body["predictions"], dtype=np.float32)

    def _status(self) -> str:
        body = self._request("GET", self._base)
        return body["model_version_status"][0]["state"]


def generator_client(target: GeneratorTarget, protocol: str = "grpc", **kwargs) -> _BaseClient:
    if protocol == "rest":
        return RestGeneratorClient(target, **kwargs)
    if protocol == "grpc":
        # TF Serving's protos import all of TensorFlow (seconds): only a gRPC client loads them.
        from .grpc_client import GrpcGeneratorClient
        return GrpcGeneratorClient(target, **kwargs)
    raise ValueError(f"unknown generator protocol {protocol!r}: use 'grpc' or 'rest'")
