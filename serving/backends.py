"""Model backends behind one interface.

* ``LocalBackend``: the SavedModel loaded in-process from the model repository (or one folder). A
  poller thread loads a newer version, warms it up, then swaps the reference; a request keeps the
  model object it started with, so a swap never fails a request in flight.
* ``TFServingBackend``: TensorFlow Serving over gRPC (``PredictionService`` for ``encode``/
  ``decode_step``/``metadata``, ``ModelService.GetModelStatus`` for readiness): one long-lived
  channel, a deadline per request, retries on UNAVAILABLE, the request id sent as metadata. Beam
  search runs here, in the gateway, with all beams of a request in each ``decode_step`` call.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner import constants as C

log = logging.getLogger(__name__)


class BackendUnavailable(Exception):
    """The model server cannot be reached or has no model loaded (HTTP 503)."""


class BackendTimeout(Exception):
    """The request's deadline passed before the model answered (HTTP 504)."""


@dataclass(frozen=True)
class DecodeRequest:
    beam_size: int
    max_length: int
    length_penalty: float | None = None
    with_attention: bool = False
    request_id: str = ""


class LocalBackend:
    name = "local"

    def __init__(self, model_repo: str = "", model_name: str = "captioner", model_dir: str = "",
                 poll_seconds: float = 5.0):
        self.model_repo, self.model_name, self.model_dir = model_repo, model_name, model_dir
        self.poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._current: tuple[Any, str] | None = None  # (SavedModelCaptioner, version)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # -- loading ---------------------------------------------------------------------------------
    def _target(self) -> tuple[Path, str] | None:
        if self.model_dir:
            return Path(self.model_dir), Path(self.model_dir).name
        from captioner.registry import STABLE, ModelRepository

        repo = ModelRepository(self.model_repo)
        versions = repo.versions(self.model_name)
        if not versions:
            return None
        stable = repo.labels(self.model_name).get(STABLE)
        version = stable if stable in versions else versions[-1]
        path = repo.model_path(self.model_name, version)
        if path.startswith("gs://"):
            import tempfile

            local = Path(tempfile.mkdtemp(prefix=f"captioner-{version}-"))
            path = str(repo.storage.download_dir(path, local))
        return Path(path), str(version)

    def load_latest(self) -> bool:
        """Load the newest (or ``stable``) version if it is not the one served; True if it swapped."""
        from captioner.predictor import SavedModelCaptioner

        try:
            target = self._target()
        except Exception as exc:  # an unreadable repository must not kill the poller
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        if target is None:
            self.last_error = f"no version of {self.model_name!r} in {self.model_repo}"
            return False
        path, version = target
        if self._current is not None and self._current[1] == version:
            return False
        try:
            model = SavedModelCaptioner(path)
            pixels = np.zeros((1, model.image_size, model.image_size, 3), np.uint8)
            model.caption_pixels(pixels, beam_size=int(model.metadata["beam_size"]))  # warm up before serving
        except Exception as exc:
            self.last_error = f"cannot load version {version}: {type(exc).__name__}: {exc}"
            log.error(self.last_error)
            return False
        with self._lock:
            self._current = (model, version)
        self.last_error = None
        log.info("serving %s version %s from %s", self.model_name, version, path)
        return True

    def start(self) -> LocalBackend:
        self.load_latest()
        if not self.model_dir and self.poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll, name="model-poller", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.load_latest()

    def close(self) -> None:
        self._stop.set()

    # -- serving ---------------------------------------------------------------------------------
    def _model(self):
        current = self._current
        if current is None:
            raise BackendUnavailable(self.last_error or "no model loaded yet")
        return current

    def ready(self) -> tuple[bool, str]:
        return (True, "model loaded") if self._current else (False, self.last_error or "no model loaded")

    def info(self) -> dict[str, Any]:
        model, version = self._model()
        return {"model_name": self.model_name, "version": version, "backend": self.name, "metadata": model.metadata}

    @property
    def image_size(self) -> int:
        return self._model()[0].image_size

    def caption(self, pixels: np.ndarray, request: DecodeRequest):
        model, version = self._model()
        results = model.caption_pixels(pixels, beam_size=request.beam_size, max_length=request.max_length,
                                       length_penalty=request.length_penalty, with_attention=request.with_attention)
        return results, version


class TFServingBackend:
    name = "tfserving"

    def __init__(self, target: str, model_name: str = "captioner", deadline_seconds: float = 10.0,
                 retries: int = 2):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.target, self.model_name = target, model_name
        self.deadline_seconds, self.retries = deadline_seconds, retries
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self.predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._meta: tuple[dict[str, Any], list[str], str] | None = None
        self._meta_lock = threading.Lock()

    def start(self) -> TFServingBackend:
        return self

    def close(self) -> None:
        self.channel.close()

    # -- gRPC with deadline and retries ---------------------------------------------------------
    def _call(self, method, request, deadline: float, request_id: str):
        import grpc

        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendTimeout(f"deadline of {self.deadline_seconds:.1f}s passed")
            try:
                return method(request, timeout=remaining, metadata=(("x-request-id", request_id or "-"),))
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise BackendTimeout(f"TF Serving did not answer within {self.deadline_seconds:.1f}s") from None
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    attempt += 1
                    time.sleep(min(0.05 * 2 ** attempt, max(0.0, deadline - time.monotonic())))
                    continue
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND,
                            grpc.StatusCode.FAILED_PRECONDITION):
                    raise BackendUnavailable(f"TF Serving at {self.target}: {code.name}: {exc.details()}") from None
                raise

    def _predict(self, signature: str, inputs: dict[str, np.ndarray], deadline: float, request_id: str,
                 version: str | None = None):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature
        if version:
            request.model_spec.version.value = int(version)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        response = self._call(self.predict_stub.Predict, request, deadline, request_id)
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}, str(response.model_spec.version.value)

    def _metadata(self, deadline: float, request_id: str) -> tuple[dict[str, Any], list[str], str]:
        out, version = self._predict(C.SIG_METADATA, {}, deadline, request_id)
        with self._meta_lock:
            if self._meta is None or self._meta[2] != version:
                vocab = [t.decode() for t in out[C.OUT_VOCAB]]
                self._meta = (json.loads(out[C.OUT_METADATA].item()), vocab, version)
            return self._meta

    # -- the backend interface ----------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        try:
            status = self._call(self.model_stub.GetModelStatus, request, time.monotonic() + min(
                2.0, self.deadline_seconds), "readiness")
        except (BackendUnavailable, BackendTimeout) as exc:
            return False, str(exc)
        available = [s.version for s in status.model_version_status
                     if s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE]
        return (True, f"versions {available} AVAILABLE") if available else (False, "no version AVAILABLE")

    def info(self) -> dict[str, Any]:
        metadata, _, version = self._metadata(time.monotonic() + self.deadline_seconds, "model-info")
        return {"model_name": self.model_name, "version": version, "backend": self.name, "target": self.target,
                "metadata": metadata}

    @property
    def image_size(self) -> int:
        return int(self._metadata(time.monotonic() + self.deadline_seconds, "image-size")[0]["input_size"])

    def caption(self, pixels: np.ndarray, request: DecodeRequest):
        from captioner.predictor import decode_images, results_from_decode

        deadline = time.monotonic() + self.deadline_seconds
        metadata, vocab, version = self._metadata(deadline, request.request_id)

        def encode(images):
            out, _ = self._predict(C.SIG_ENCODE, {C.IN_IMAGES: np.asarray(images, np.uint8)}, deadline,
                                   request.request_id, version)
            return out[C.OUT_FEATURES]

        def step(features, tokens, state):
            out, _ = self._predict(C.SIG_DECODE_STEP, {C.IN_FEATURES: np.asarray(features, np.float32),
                                                       C.IN_TOKENS: np.asarray(tokens, np.int32),
                                                       C.IN_STATE: np.asarray(state, np.float32)},
                                   deadline, request.request_id, version)
            return out[C.OUT_LOG_PROBS], out[C.OUT_ATTENTION], out[C.OUT_STATE]

        alpha = metadata["length_penalty"] if request.length_penalty is None else request.length_penalty
        out = decode_images(encode, step, pixels, num_regions=int(metadata["num_regions"]),
                            state_shape=metadata["state_shape"], beam_size=request.beam_size,
                            max_length=request.max_length, length_penalty=float(alpha))
        return results_from_decode({k: np.asarray(v) for k, v in out.items()}, vocab, request.with_attention), version


def make_backend(settings):
    if settings.backend == "tfserving":
        return TFServingBackend(settings.tfserving_target, settings.model_name, settings.deadline_seconds,
                                settings.retries)
    return LocalBackend(settings.model_repo, settings.model_name, settings.model_dir, settings.poll_seconds)
