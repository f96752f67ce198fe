"""The generator's gRPC client: TF Serving's ``PredictionService`` and ``ModelService``."""
from __future__ import annotations

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from ..model.signature import INPUT_KEY, OUTPUT_KEY, SIGNATURE
from .client import (_STATE_NAMES, VERSION_HEADER, GeneratorError, GeneratorTarget, GeneratorUnavailable,
                     _BaseClient, _channel, _Transient)


def _string_tensor(texts: list[str]) -> tensor_pb2.TensorProto:
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(texts))])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape,
                                  string_val=[t.encode("utf-8") for t in texts])


def floats_from_tensor(proto: tensor_pb2.TensorProto) -> np.ndarray:
    shape = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_content:
        values = np.frombuffer(proto.tensor_content, dtype=np.float32)
    else:
        values = np.asarray(proto.float_val, dtype=np.float32)
    return values.reshape(shape)


class GrpcGeneratorClient(_BaseClient):
    """``PredictionService.Predict`` and ``ModelService.GetModelStatus`` over gRPC."""

    _TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}

    def __init__(self, target: GeneratorTarget, **kwargs):
        super().__init__(target, **kwargs)
        channel = _channel(target.grpc_address)
        self._predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(channel)
        self._metadata = ((VERSION_HEADER, target.version),)

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            message = f"{exc.code().name}: {exc.details()}"
            if exc.code() in self._TRANSIENT:
                raise _Transient(message) from exc
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise GeneratorUnavailable(f"generator {self.target.version} timed out after {self.timeout}s") from exc
            raise GeneratorError(f"generator {self.target.version}: {message}") from exc

    def _predict(self, texts: list[str]) -> np.ndarray:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.target.model_name
        request.model_spec.version.value = self.number
        request.model_spec.signature_name = SIGNATURE
        request.inputs[INPUT_KEY].CopyFrom(_string_tensor(texts))
        return floats_from_tensor(self._call(self._predictions.Predict, request).outputs[OUTPUT_KEY])

    def _status(self) -> str:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.target.model_name
        request.model_spec.version.value = self.number
        reply = self._call(self._models.GetModelStatus, request)
        return _STATE_NAMES.get(reply.model_version_status[0].state, "UNKNOWN")
