"""A minimal TensorFlow Serving stand-in: the ``PredictionService.Predict`` and
``ModelService.GetModelStatus`` gRPC APIs over SavedModels in a model repository.

No TF Serving binary exists on machines without Docker; this server speaks the same protocol
(``tensorflow-serving-api`` protos) so the gateway's gRPC backend is tested against a real server,
and it can stand in for TF Serving when developing on a laptop.
"""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc


class ModelServer:
    def __init__(self, model_repo: str | Path, model_name: str = "captioner", port: int = 0,
                 delay_seconds: float = 0.0):
        self.model_repo, self.model_name = Path(model_repo), model_name
        self.delay_seconds = delay_seconds  # to test the gateway's deadlines
        self.models: dict[int, object] = {}
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self._register()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def load(self) -> list[int]:
        import tensorflow as tf

        from captioner.registry import ModelRepository

        for version in ModelRepository(self.model_repo).versions(self.model_name):
            if version not in self.models:
                path = self.model_repo / self.model_name / str(version)
                model = tf.saved_model.load(str(path), tags=["serve"])
                with self._lock:
                    self.models[version] = model
        return sorted(self.models)

    def _register(self) -> None:
        from tensorflow_serving.apis import (
            get_model_status_pb2,
            model_service_pb2_grpc,
            predict_pb2,
            prediction_service_pb2_grpc,
        )

        outer = self

        class Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
            def Predict(self, request, context):
                import time

                import tensorflow as tf

                if outer.delay_seconds:
                    time.sleep(outer.delay_seconds)
                if request.model_spec.name != outer.model_name:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found: {request.model_spec.name}")
                with outer._lock:
                    versions = sorted(outer.models)
                    version = request.model_spec.version.value if request.model_spec.HasField("version") else (
                        versions[-1] if versions else None)
                    model = outer.models.get(version)
                if model is None:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"version {version} of {outer.model_name} not loaded")
                signature_name = request.model_spec.signature_name or "serving_default"
                if signature_name not in model.signatures:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no signature {signature_name}")
                inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
                try:
                    outputs = model.signatures[signature_name](**inputs)
                except (TypeError, ValueError, tf.errors.InvalidArgumentError) as exc:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:500])
                response = predict_pb2.PredictResponse()
                response.model_spec.name = outer.model_name
                response.model_spec.version.value = version
                response.model_spec.signature_name = signature_name
                for key, value in outputs.items():
                    response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
                return response

        class Models(model_service_pb2_grpc.ModelServiceServicer):
            def GetModelStatus(self, request, context):
                response = get_model_status_pb2.GetModelStatusResponse()
                if request.model_spec.name != outer.model_name:
                    context.abort(grpc.StatusCode.NOT_FOUND, "model not found")
                with outer._lock:
                    versions = sorted(outer.models)
                for version in versions:
                    status = response.model_version_status.add()
                    status.version = version
                    status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
                return response

        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Prediction(), self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(Models(), self.server)

    def start(self) -> ModelServer:
        self.load()
        self.server.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace)
