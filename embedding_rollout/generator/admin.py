"""Load and unload versions on a running model server (the project's or ``tensorflow/serving``).

Uses ``ModelService.HandleReloadConfigRequest`` with a ``specific`` version policy listing every
version to serve, which is how a running TF Serving changes its served set; loading is
make-before-break because the new list keeps the versions that stay. Because a reload replaces the
whole list, a change is a read-modify-write: two deploy steps at once would each drop the other's
version. Changes hold an exclusive ``flock`` (on a file in ``ER_HOME``, shared by every step on the
machine or volume) from reading the served set to sending the new one, and a version still loading
counts as served.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import grpc
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2, model_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from ..locks import exclusive_lock
from .client import _STATE_NAMES, VERSION_HEADER, GeneratorError, _channel


class ModelServerAdmin:
    def __init__(self, grpc_address: str, model_name: str, base_path: str, timeout: float = 120.0,
                 lock_path: Path | None = None):
        self.stub = model_service_pb2_grpc.ModelServiceStub(_channel(grpc_address))
        self.model_name, self.base_path, self.timeout = model_name, base_path, timeout
        self.lock_path = lock_path

    def statuses(self) -> dict[int, str]:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        try:
            reply = self.stub.GetModelStatus(request, timeout=10)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return {}
            raise GeneratorError(f"model server: {exc.code().name}: {exc.details()}") from exc
        return {s.version: _STATE_NAMES.get(s.state, "UNKNOWN") for s in reply.model_version_status}

    def status(self, number: int) -> str | None:
        """One version's state. Carries ``x-model-version``, so that through a mesh the call reaches
        that version's generator (the generator's VirtualService routes on nothing else)."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        request.model_spec.version.value = number
        try:
            reply = self.stub.GetModelStatus(request, timeout=10, metadata=((VERSION_HEADER, f"v{number}"),))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise GeneratorError(f"model server: {exc.code().name}: {exc.details()}") from exc
        states = {s.version: _STATE_NAMES.get(s.state, "UNKNOWN") for s in reply.model_version_status}
        return states.get(number)

    def served(self) -> list[int]:
        return sorted(n for n, state in self.statuses().items() if state == "AVAILABLE")

    def _wanted(self) -> list[int]:
        """What the server is serving or loading now: a reload must keep all of it."""
        return sorted(n for n, state in self.statuses().items() if state in ("START", "LOADING", "AVAILABLE"))

    def _changing(self):
        return nullcontext() if self.lock_path is None else exclusive_lock(self.lock_path)

    def serve(self, versions: list[int]) -> None:
        config = model_server_config_pb2.ModelServerConfig()
        entry = config.model_config_list.config.add()
        entry.name, entry.base_path, entry.model_platform = self.model_name, self.base_path, "tensorflow"
        entry.model_version_policy.specific.versions.extend(sorted(set(versions)))
        request = model_management_pb2.ReloadConfigRequest(config=config)
        try:
            reply = self.stub.HandleReloadConfigRequest(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise GeneratorError(f"model server reload failed: {exc.code().name}: {exc.details()}") from exc
        if reply.status.error_code:
            raise GeneratorError(f"model server reload failed: {reply.status.error_message}")

    def load(self, number: int) -> None:
        with self._changing():
            self.serve(self._wanted() + [number])
        self.wait_available(number)

    def unload(self, number: int) -> None:
        with self._changing():
            self.serve([n for n in self._wanted() if n != number])

    def wait_available(self, number: int) -> None:
        deadline = time.monotonic() + self.timeout
        while (state := self.status(number)) != "AVAILABLE":
            if state == "END" or time.monotonic() > deadline:
                raise GeneratorError(f"version {number} of {self.model_name} is {state or 'unknown'}, not AVAILABLE")
            time.sleep(0.2)
