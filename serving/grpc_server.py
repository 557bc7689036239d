"""A TensorFlow Serving stand-in: the ``PredictionService.Predict`` and ``ModelService.GetModelStatus``
gRPC APIs over SavedModels in a model repository, with TF Serving's rules where they matter to clients.

No TF Serving binary exists on machines without Docker; this server speaks the same protocol
(``tensorflow-serving-api`` protos) so the gateway's gRPC backend is tested against a real server,
and it can stand in for TF Serving when developing on a laptop. What it copies from TF Serving:

* **Model config.** ``<repo>/models.config`` (as the registry writes it) says which versions to load
  (``model_version_policy``) and its ``version_labels``; it is re-read every ``poll_seconds``, as
  ``--model_config_file_poll_wait_seconds`` does. ``model_spec.version`` / ``version_label`` pick a
  version (an unknown label is INVALID_ARGUMENT "Unrecognized servable version label"), neither
  means the newest; the response's ``model_spec`` names the version that answered.
* **Batching** (``--enable_batching``, on by default here as in the shipped config), after
  ``tensorflow_serving/batching/batching_session.cc``: concurrent Predict calls on the same version
  and signature (all of its inputs and outputs) within ``batch_timeout_seconds`` are merged by
  concatenating every input along axis 0, run once, and the outputs split back by each request's row
  count. A request without inputs, with a scalar input or with inputs of different row counts is
  INVALID_ARGUMENT; inputs whose other axes differ between merged requests fail the whole batch with
  FAILED_PRECONDITION (no ``pad_variable_length_inputs``); more rows than ``max_batch_size`` in one
  request is INVALID_ARGUMENT. A call with an output filter is not the signature's tensor set and
  runs on its own, unbatched, as in TF Serving.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np


class ServingError(Exception):
    """A gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class _Task:
    def __init__(self, inputs: dict[str, np.ndarray], size: int):
        self.inputs, self.size = inputs, size
        self.done = threading.Event()
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: ServingError | None = None


class _Batch:
    def __init__(self):
        self.tasks: list[_Task] = []
        self.size = 0
        self.closed = threading.Event()


def batch_size_of(inputs: dict[str, np.ndarray]) -> int:
    """The rows of one request, with BatchingSession's checks (``ComputeTensorBatchSize``)."""
    if not inputs:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Batching Run() must have at least one input tensor")
    sizes = set()
    for value in inputs.values():
        if value.ndim == 0:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               "Batching Run() input tensors must have at least one dimension")
        sizes.add(value.shape[0])
    if len(sizes) > 1:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           "Batching Run() input tensors must have equal 0th-dimension size")
    return sizes.pop()


class Batcher:
    """One queue per (version, signature): the first request of a batch waits up to ``timeout`` for
    others (or until ``max_batch_size`` rows), then runs the merged batch for all of them."""

    def __init__(self, run, max_batch_size: int, timeout: float, threads: threading.Semaphore,
                 on_batch=None):
        self.run, self.max_batch_size, self.timeout = run, max_batch_size, timeout
        self.threads, self.on_batch = threads, on_batch
        self._lock = threading.Lock()
        self._open: _Batch | None = None

    def submit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = batch_size_of(inputs)
        if size > self.max_batch_size:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Task size {size} is larger than maximum input batch size {self.max_batch_size}")
        task = _Task(inputs, size)
        with self._lock:
            batch, leader = self._open, False
            if batch is None or batch.size + size > self.max_batch_size:
                if batch is not None:  # no room: that batch goes as it is, this task starts the next
                    batch.closed.set()
                batch, leader = _Batch(), True
                self._open = batch
            batch.tasks.append(task)
            batch.size += size
            if batch.size >= self.max_batch_size:
                batch.closed.set()
                self._open = None
        if leader:
            batch.closed.wait(self.timeout)
            with self._lock:
                if self._open is batch:
                    self._open = None
            self._process(batch)
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    def _process(self, batch: _Batch) -> None:
        try:
            with self.threads:
                merged = self._merge(batch.tasks)
                outputs = self.run(merged)
                self._split(batch, outputs)
            if self.on_batch is not None:
                self.on_batch(len(batch.tasks), batch.size)
        except ServingError as exc:
            for task in batch.tasks:
                task.error = exc
        except Exception as exc:  # the model failed on the merged batch: every request in it fails
            error = _model_error(exc)
            for task in batch.tasks:
                task.error = error
        finally:
            for task in batch.tasks:
                task.done.set()

    @staticmethod
    def _merge(tasks: list[_Task]) -> dict[str, np.ndarray]:
        merged = {}
        for name in tasks[0].inputs:
            reference = tasks[0].inputs[name].shape[1:]
            for task in tasks[1:]:
                if task.inputs[name].shape[1:] != reference:
                    raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, (
                        f"Tensors with name '{name}' from different tasks have different shapes and padding "
                        "is turned off.Set pad_variable_length_inputs to true, or ensure that all tensors "
                        "with the same namehave equal dimensions starting with the first dim."))
            merged[name] = np.concatenate([task.inputs[name] for task in tasks], axis=0)
        return merged

    @staticmethod
    def _split(batch: _Batch, outputs: dict[str, np.ndarray]) -> None:
        for name, value in outputs.items():
            if value.ndim == 0:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, "Batched output tensor has 0 dimensions")
            if value.shape[0] != batch.size:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, (
                    "Batched output tensor's 0th dimension does not equal the sum of the 0th dimension "
                    f"sizes of the input tensors ({name}: {value.shape[0]} != {batch.size})"))
        start = 0
        for task in batch.tasks:
            task.outputs = {name: value[start:start + task.size] for name, value in outputs.items()}
            start += task.size


def _model_error(exc: Exception) -> ServingError:
    import tensorflow as tf

    if isinstance(exc, (TypeError, ValueError, tf.errors.InvalidArgumentError)):
        return ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:500])
    return ServingError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {str(exc)[:500]}")


def read_model_config(path: Path, model_name: str) -> tuple[list[int] | None, dict[str, int]] | None:
    """``(versions to serve or None for "the policy's pick", labels)`` for ``model_name`` from a TF
    Serving model config file; None when the file does not exist or does not name the model."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    if not path.is_file():
        return None
    config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    for entry in config.model_config_list.config:
        if entry.name == model_name:
            policy = entry.model_version_policy
            kind = policy.WhichOneof("policy_choice")
            if kind == "specific":
                versions = sorted(policy.specific.versions)
            elif kind == "all":
                versions = None
            else:  # latest (TF Serving's default: the newest one)
                versions = [-max(1, policy.latest.num_versions if kind == "latest" else 1)]
            return versions, dict(entry.version_labels)
    return None


class ModelServer:
    def __init__(self, model_repo: str | Path, model_name: str = "captioner", port: int = 0,
                 delay_seconds: float = 0.0, *, batching: bool = True, max_batch_size: int = 128,
                 batch_timeout_seconds: float = 0.002, num_batch_threads: int = 4, poll_seconds: float = 1.0):
        self.model_repo, self.model_name = Path(model_repo), model_name
        self.delay_seconds = delay_seconds  # to test the gateway's deadlines
        self.batching, self.max_batch_size = batching, max_batch_size
        self.batch_timeout_seconds, self.poll_seconds = batch_timeout_seconds, poll_seconds
        self.models: dict[int, Any] = {}
        self.labels: dict[str, int] = {}
        self._batch_threads = threading.Semaphore(num_batch_threads)
        self._batchers: dict[tuple[int, str], Batcher] = {}
        # (signature, requests merged, rows) -> count; and (request id, signature, version) per call.
        self.batches: collections.Counter = collections.Counter()
        self.calls: collections.deque = collections.deque(maxlen=100_000)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self._register()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def merged_batches(self, signature: str | None = None) -> int:
        """How many batches held more than one request."""
        return sum(n for (sig, tasks, _), n in self.batches.items() if tasks > 1 and signature in (None, sig))

    # -- the model config: versions and labels ------------------------------------------------------
    def load(self) -> list[int]:
        """Read the model config (or, without one, serve every complete version), load the versions
        it asks for, unload the others, then apply its labels to loaded versions."""
        import tensorflow as tf

        from captioner.registry import MODELS_CONFIG, ModelRepository

        available = ModelRepository(self.model_repo).versions(self.model_name)
        config = read_model_config(self.model_repo / MODELS_CONFIG, self.model_name)
        wanted, labels = (None, {}) if config is None else config
        if wanted is None:
            wanted = available
        elif wanted and wanted[0] < 0:
            wanted = available[wanted[0]:]
        wanted = [v for v in wanted if v in available]
        for version in wanted:
            if version not in self.models:
                model = tf.saved_model.load(str(self.model_repo / self.model_name / str(version)), tags=["serve"])
                with self._lock:
                    self.models[version] = model
        with self._lock:
            for version in [v for v in self.models if v not in wanted]:
                del self.models[version]
                for key in [k for k in self._batchers if k[0] == version]:
                    del self._batchers[key]
            # A label can only name a loaded (AVAILABLE) version, as in TF Serving.
            self.labels = {k: v for k, v in labels.items() if v in self.models}
            return sorted(self.models)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.load()
            except Exception:  # a half-written config or version: try again at the next poll
                continue

    def resolve(self, model_spec) -> int:
        with self._lock:
            versions = sorted(self.models)
            choice = model_spec.WhichOneof("version_choice")
            if choice == "version_label":
                label = model_spec.version_label
                if label not in self.labels:
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"Unrecognized servable version label: {label}")
                return self.labels[label]
            if choice == "version":
                version = model_spec.version.value
                if version not in self.models:
                    raise ServingError(grpc.StatusCode.NOT_FOUND,
                                       f"Servable not found for request: Specific({self.model_name}, {version})")
                return version
            if not versions:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: Latest({self.model_name})")
            return versions[-1]

    # -- Predict ----------------------------------------------------------------------------------
    def predict(self, request, request_id: str = "-") -> tuple[int, str, dict[str, np.ndarray]]:
        import tensorflow as tf

        if request.model_spec.name != self.model_name:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request.model_spec.name}")
        version = self.resolve(request.model_spec)
        with self._lock:
            model = self.models.get(version)
        if model is None:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"version {version} of {self.model_name} not loaded")
        name = request.model_spec.signature_name or "serving_default"
        if name not in model.signatures:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Serving signature name: \"{name}\" not found")
        signature = model.signatures[name]
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        declared_inputs = set(signature.structured_input_signature[1])
        declared_outputs = set(signature.structured_outputs)
        outputs = set(request.output_filter) or declared_outputs
        if set(inputs) != declared_inputs:
            missing = sorted(declared_inputs - set(inputs))
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input tensor alias not found in signature: {sorted(set(inputs) - declared_inputs)}"
                               if not missing else f"Missing input tensors: {missing}")
        if not outputs <= declared_outputs:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"output tensor alias not found in signature: {sorted(outputs - declared_outputs)}")

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            result = signature(**{k: tf.constant(v) for k, v in feeds.items()})
            return {k: v.numpy() for k, v in result.items() if k in outputs}

        self.calls.append((request_id, name, version))
        if self.batching and outputs == declared_outputs:
            with self._lock:
                batcher = self._batchers.get((version, name))
                if batcher is None:
                    batcher = self._batchers[(version, name)] = Batcher(
                        run, self.max_batch_size, self.batch_timeout_seconds, self._batch_threads,
                        on_batch=lambda tasks, rows, sig=name: self._count(sig, tasks, rows))
            return version, name, batcher.submit(inputs)
        try:
            return version, name, run(inputs)
        except Exception as exc:
            raise _model_error(exc) from None

    def _count(self, signature: str, tasks: int, rows: int) -> None:
        with self._lock:
            self.batches[(signature, tasks, rows)] += 1

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
                import tensorflow as tf

                if outer.delay_seconds:
                    time.sleep(outer.delay_seconds)
                request_id = dict(context.invocation_metadata()).get("x-request-id", "-")
                try:
                    version, name, outputs = outer.predict(request, request_id)
                except ServingError as exc:
                    context.abort(exc.code, str(exc))
                response = predict_pb2.PredictResponse()
                response.model_spec.name = outer.model_name
                response.model_spec.version.value = version
                response.model_spec.signature_name = name
                for key, value in outputs.items():
                    response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
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
        if self.poll_seconds > 0:
            self._poller = threading.Thread(target=self._poll, name="model-config-poller", daemon=True)
            self._poller.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        self._stop.set()
        self.server.stop(grace)
