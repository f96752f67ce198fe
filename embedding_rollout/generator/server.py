"""A model server speaking TF Serving's REST and gRPC APIs for the SavedModels of one model.

REST: ``POST /v1/models/<name>[/versions/<n>]:predict`` (row ``instances`` or columnar ``inputs``),
``GET /v1/models/<name>[/versions/<n>]`` (status) and ``…/metadata``. gRPC:
``PredictionService.Predict``/``GetModelMetadata`` and ``ModelService.GetModelStatus``/
``HandleReloadConfigRequest`` with the protos of ``tensorflow-serving-api``, so the project's
client works unchanged against the ``tensorflow/serving`` image.
"""
from __future__ import annotations

import json
import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from flask import Flask, Response, request
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_management_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)
from werkzeug.serving import make_server

from ..model.trainer import INPUT_KEY, OUTPUT_KEY, SIGNATURE
from .models import BadRequest, InjectedFault, ModelManager, ServableNotFound, available_versions

log = logging.getLogger(__name__)

_STATE_CODES = {"UNKNOWN": 0, "START": 10, "LOADING": 20, "AVAILABLE": 30, "UNLOADING": 40, "END": 50}


# -- tensors ---------------------------------------------------------------------------------
def strings_from_tensor(proto: tensor_pb2.TensorProto) -> list[str]:
    if proto.dtype != types_pb2.DT_STRING:
        raise BadRequest(f"input '{INPUT_KEY}' must be DT_STRING")
    return [value.decode("utf-8") for value in proto.string_val]


def tensor_from_floats(matrix: np.ndarray) -> tensor_pb2.TensorProto:
    matrix = np.asarray(matrix, dtype=np.float32)
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in matrix.shape])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape,
                                  tensor_content=matrix.tobytes())


# -- REST ------------------------------------------------------------------------------------
def _json(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


def _error(message: str, status: int) -> Response:
    return _json({"error": message}, status)


def _status_json(manager: ModelManager, number: int | None) -> dict:
    return {"model_version_status": [
        {"version": str(s.version), "state": s.state,
         "status": {"error_code": "OK" if not s.error else "UNKNOWN", "error_message": s.error}}
        for s in manager.statuses(number)]}


def _rest_texts(body: dict) -> tuple[list[str], bool]:
    """Texts of a REST predict body, and whether it used the row format."""
    if "instances" in body:
        rows = body["instances"]
        texts = [r[INPUT_KEY] if isinstance(r, dict) else r for r in rows] if isinstance(rows, list) else rows
        return texts, True
    if "inputs" in body:
        inputs = body["inputs"]
        return (inputs.get(INPUT_KEY) if isinstance(inputs, dict) else inputs), False
    raise BadRequest("Missing 'instances' or 'inputs' key")


def create_rest_app(manager: ModelManager) -> Flask:
    app = Flask("embedding-generator")

    def check_model(name: str) -> None:
        if name != manager.name:
            raise ServableNotFound(f"Could not find any versions of model {name}")

    @app.errorhandler(ServableNotFound)
    def not_found(exc):
        return _error(str(exc), 404)

    @app.errorhandler(BadRequest)
    def bad_request(exc):
        return _error(str(exc), 400)

    @app.errorhandler(InjectedFault)
    def injected(exc):
        return _error(str(exc), 500)

    @app.get("/v1/models/<name>")
    @app.get("/v1/models/<name>/versions/<int:number>")
    def model_status(name: str, number: int | None = None):
        check_model(name)
        return _json(_status_json(manager, number))

    @app.get("/v1/models/<name>/metadata")
    @app.get("/v1/models/<name>/versions/<int:number>/metadata")
    def model_metadata(name: str, number: int | None = None):
        check_model(name)
        resolved, _ = manager.resolve(number)
        return _json({"model_spec": {"name": name, "signature_name": "", "version": str(resolved)},
                      "metadata": {"signature_def": {"signature_def": {SIGNATURE: manager.signature_def(resolved)}}}})

    @app.post("/v1/models/<name>:predict")
    @app.post("/v1/models/<name>/versions/<int:number>:predict")
    def predict(name: str, number: int | None = None):
        check_model(name)
        try:
            body = json.loads(request.get_data() or b"null")
        except ValueError as exc:
            raise BadRequest(f"JSON Parse error: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("JSON Value: request body must be an object")
        if body.get("signature_name", SIGNATURE) != SIGNATURE:
            raise BadRequest(f"Serving signature name: \"{body['signature_name']}\" not found in signature def")
        texts, rows = _rest_texts(body)
        _, vectors = manager.predict(texts, number)
        return _json({"predictions": vectors.tolist()} if rows else {"outputs": vectors.tolist()})

    @app.put("/admin/faults/<int:number>")
    def set_fault(number: int):
        """Project extension (not TF Serving): inject failures to test analysis and rollback."""
        rate = (request.get_json(silent=True) or {}).get("rate")
        if not isinstance(rate, (int, float)):
            raise BadRequest("body must be {\"rate\": <0..1>}")
        manager.set_fault_rate(number, float(rate))
        return _json({"version": number, "rate": float(rate)})

    return app


# -- gRPC ------------------------------------------------------------------------------------
def _spec_version(model_spec) -> int | None:
    return model_spec.version.value if model_spec.HasField("version") else None


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def Predict(self, req: predict_pb2.PredictRequest, context):
        with _grpc_errors(context, self.manager, req.model_spec.name):
            if req.model_spec.signature_name not in ("", SIGNATURE):
                raise BadRequest(f"Serving signature name: \"{req.model_spec.signature_name}\" not found")
            if INPUT_KEY not in req.inputs:
                raise BadRequest(f"input '{INPUT_KEY}' is missing")
            number, vectors = self.manager.predict(strings_from_tensor(req.inputs[INPUT_KEY]),
                                                   _spec_version(req.model_spec))
            reply = predict_pb2.PredictResponse()
            reply.model_spec.name = self.manager.name
            reply.model_spec.version.value = number
            reply.model_spec.signature_name = SIGNATURE
            reply.outputs[OUTPUT_KEY].CopyFrom(tensor_from_floats(vectors))
            return reply

    def GetModelMetadata(self, req, context):
        with _grpc_errors(context, self.manager, req.model_spec.name):
            number, _ = self.manager.resolve(_spec_version(req.model_spec))
            reply = get_model_metadata_pb2.GetModelMetadataResponse()
            reply.model_spec.name = self.manager.name
            reply.model_spec.version.value = number
            return reply


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, req, context):
        with _grpc_errors(context, self.manager, req.model_spec.name):
            reply = get_model_status_pb2.GetModelStatusResponse()
            for s in self.manager.statuses(_spec_version(req.model_spec)):
                entry = reply.model_version_status.add(version=s.version, state=_STATE_CODES[s.state])
                entry.status.error_code = 0 if not s.error else 2
                entry.status.error_message = s.error
            return reply

    def HandleReloadConfigRequest(self, req, context):
        reply = model_management_pb2.ReloadConfigResponse()
        configs = list(req.config.model_config_list.config)
        mine = [c for c in configs if c.name == self.manager.name]
        if len(configs) != 1 or not mine:
            reply.status.error_code = 3
            reply.status.error_message = f"this server serves exactly one model: {self.manager.name}"
            return reply
        policy = mine[0].model_version_policy
        if policy.WhichOneof("policy_choice") == "specific":
            wanted = list(policy.specific.versions)
        else:
            found = available_versions(self.manager.base_path)
            wanted = found if policy.WhichOneof("policy_choice") == "all" else found[-1:]
        self.manager.serve(wanted)
        failed = [s for s in self.manager.statuses() if s.version in wanted and s.state != "AVAILABLE"]
        if failed:
            reply.status.error_code = 2
            reply.status.error_message = "; ".join(s.error or f"version {s.version} not available" for s in failed)
        return reply


class _grpc_errors:
    """Map domain errors to gRPC status codes, as TF Serving does."""

    def __init__(self, context, manager: ModelManager, model_name: str):
        self.context, self.manager, self.model_name = context, manager, model_name

    def __enter__(self):
        if self.model_name != self.manager.name:
            self.context.abort(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: Latest({self.model_name})")

    def __exit__(self, kind, exc, tb):
        codes = {ServableNotFound: grpc.StatusCode.NOT_FOUND, BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
                 InjectedFault: grpc.StatusCode.INTERNAL}
        for error, code in codes.items():
            if isinstance(exc, error):
                self.context.abort(code, str(exc))
        return False


# -- process ---------------------------------------------------------------------------------
class ModelServer:
    """REST and gRPC front ends over one :class:`ModelManager`, on 127.0.0.1 by default."""

    def __init__(self, manager: ModelManager, host: str = "127.0.0.1", rest_port: int = 8501,
                 grpc_port: int = 8500, workers: int = 8):
        self.manager = manager
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(manager), self.grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager), self.grpc)
        self.grpc_port = self.grpc.add_insecure_port(f"{host}:{grpc_port}")
        self.rest = make_server(host, rest_port, create_rest_app(manager), threaded=True)
        self.rest_port = self.rest.server_port
        self._thread = threading.Thread(target=self.rest.serve_forever, name="rest", daemon=True)

    def start(self) -> "ModelServer":
        self.grpc.start()
        self._thread.start()
        log.info("model server: REST on %d, gRPC on %d", self.rest_port, self.grpc_port)
        return self

    def stop(self) -> None:
        self.rest.shutdown()
        self.grpc.stop(grace=1).wait()


def serve_forever(model_dir: Path, versions: list[int] | None, host: str, rest_port: int, grpc_port: int) -> None:
    manager = ModelManager(model_dir.name, model_dir)
    manager.serve(versions if versions else available_versions(model_dir)[-1:])
    server = ModelServer(manager, host, rest_port, grpc_port).start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()
