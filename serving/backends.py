"""Model backends behind one interface.

* ``LocalBackend``: the SavedModel loaded in-process from the model repository (or one folder). A
  poller thread loads a newer version, warms it up, then swaps the reference; a request keeps the
  model object it started with, so a swap never fails a request in flight. With batching on
  (``serving/batching.py``), concurrent requests to one version are encoded together and advance
  together in one shared decode loop; off, each request decodes alone in one graph call.
* ``TFServingBackend``: TensorFlow Serving over gRPC (``PredictionService`` for ``encode``/
  ``decode_step``/``metadata``, ``ModelService.GetModelStatus`` for readiness): one long-lived
  channel, a deadline per request, retries on UNAVAILABLE, the request id sent as metadata. Beam
  search runs here, in the gateway, with all beams of a request in each ``decode_step`` call. Each
  request runs on one version: the one TF Serving resolves ``model_label`` (or ``model_version``) to
  when the request starts.

Both give ``snapshot()``: the version a request uses, its metadata and a ``caption`` bound to it; and
both call ``on_call(signature, seconds)`` / ``on_decode(steps)`` when set (metrics); the local
backend with batching also ``on_batch(signature, rows)`` and ``on_queue(seconds)``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner import constants as C

log = logging.getLogger(__name__)
# The local backend's one timed call: encode and all decode steps, in one graph.
IN_PROCESS_DECODE = "in_process_decode"


class BackendUnavailable(Exception):
    """The model server cannot be reached or has no model loaded (HTTP 503)."""


class BackendTimeout(Exception):
    """The request's deadline passed before the model answered (HTTP 504)."""


class BackendOverloaded(Exception):
    """The model server refused the work for now, e.g. gRPC RESOURCE_EXHAUSTED (HTTP 503 + Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class BackendContractError(Exception):
    """The model server broke the contract: INVALID_ARGUMENT, FAILED_PRECONDITION, INTERNAL or
    UNIMPLEMENTED from TF Serving, or a malformed response (HTTP 502)."""


@dataclass(frozen=True)
class DecodeRequest:
    beam_size: int
    max_length: int
    length_penalty: float | None = None
    with_attention: bool = False
    request_id: str = ""


CallHook = Callable[[str, float], None]     # (signature name, seconds) after each model call
DecodeHook = Callable[[int], None]          # decode steps of one request
BatchHook = Callable[[str, int], None]      # (signature, rows) of each batched model call
QueueHook = Callable[[float], None]         # seconds a request waited for the batch scheduler


@dataclass
class ModelSnapshot:
    """One model version for one request: the input size and caption lengths ``/predict`` checks
    against come from the version that ``caption`` decodes with, even when a new version is swapped
    in (local) or a label moves (TF Serving) in between. Read ``version`` after ``caption``: when TF
    Serving unloads the version mid-request, the caption is decoded again, whole, on the version the
    label names now (if it takes the same input), and ``version`` says so."""

    version: str
    metadata: dict[str, Any]
    caption: Callable[[np.ndarray, DecodeRequest], list]   # -> list[Caption], decoded by ``version``

    @property
    def image_size(self) -> int:
        return int(self.metadata["input_size"])

    @property
    def max_length(self) -> int:
        """The export's default caption length."""
        return int(self.metadata.get("max_length", 20))

    @property
    def beam_size(self) -> int:
        """The export's beam width: the one its length penalty was tuned and its test figures taken with."""
        return int(self.metadata.get("beam_size", 3))

    @property
    def max_decode_length(self) -> int:
        """The longest caption this version's decode state holds."""
        return int(self.metadata.get("max_decode_length", self.max_length))


def snapshot_of(backend, request_id: str = "") -> ModelSnapshot:
    """``backend.snapshot()``; for a backend with only ``info``/``caption`` (a test double), one
    built from those."""
    if hasattr(backend, "snapshot"):
        return backend.snapshot(request_id)
    info = backend.info()
    return ModelSnapshot(str(info["version"]), info["metadata"],
                         lambda pixels, request: backend.caption(pixels, request)[0])


class LocalBackend:
    name = "local"

    def __init__(self, model_repo: str = "", model_name: str = "captioner", model_dir: str = "",
                 poll_seconds: float = 5.0, batching: bool = False, batch_max_size: int = 128,
                 batch_timeout_ms: float = 1.0, batch_encode_wait_ms: float = 0.0, intra_op_threads: int = 0):
        self.model_repo, self.model_name, self.model_dir = model_repo, model_name, model_dir
        self.intra_op_threads = intra_op_threads
        self.poll_seconds = poll_seconds
        self.batching, self.batch_max_size, self.batch_timeout_ms = batching, batch_max_size, batch_timeout_ms
        self.batch_encode_wait_ms = batch_encode_wait_ms
        self._lock = threading.Lock()
        # (SavedModelCaptioner, version, its BatchScheduler or None): a request keeps all three.
        self._current: tuple[Any, str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.on_call: CallHook | None = None
        self.on_decode: DecodeHook | None = None
        self.on_batch: BatchHook | None = None
        self.on_queue: QueueHook | None = None

    # -- loading ---------------------------------------------------------------------------------
    def _target(self) -> tuple[str, str] | None:
        """``(location, version)`` of the version to serve: a listing and labels.json, no download."""
        if self.model_dir:
            return str(self.model_dir), Path(self.model_dir).name
        from captioner.registry import STABLE, ModelRepository

        if getattr(self, "_repository", None) is None:  # one storage client for the poller's lifetime
            self._repository = ModelRepository(self.model_repo)
        repo = self._repository
        versions = repo.versions(self.model_name)
        if not versions:
            return None
        stable = repo.labels(self.model_name).get(STABLE)
        version = stable if stable in versions else versions[-1]
        return repo.model_path(self.model_name, version), str(version)

    def _local_path(self, location: str, version: str) -> Path:
        """A local folder for ``location``: itself, or for ``gs://`` one download per version into
        this backend's own cache folder (made on first use, removed at exit)."""
        if not location.startswith("gs://"):
            return Path(location)
        import atexit
        import os
        import shutil
        import tempfile

        if getattr(self, "_cache", None) is None:
            self._cache = Path(tempfile.mkdtemp(prefix="captioner-gateway-"))
            atexit.register(shutil.rmtree, self._cache, True)
        local = self._cache / version
        if not (local / "saved_model.pb").is_file():
            partial = self._cache / f".{version}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            self._repository.storage.download_dir(location, partial)
            os.rename(partial, local)
        return local

    def _prune(self, keep: set[str]) -> None:
        """Delete this backend's downloaded copies of versions it no longer serves or tries."""
        import shutil

        cache = getattr(self, "_cache", None)
        if cache is not None and cache.is_dir():
            for entry in cache.iterdir():
                if entry.name not in keep:
                    shutil.rmtree(entry, ignore_errors=True)

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
        location, version = target
        if self._current is not None and self._current[1] == version:
            return False
        try:
            path = self._local_path(location, version)
            model = SavedModelCaptioner(path)
            pixels = np.zeros((1, model.image_size, model.image_size, 3), np.uint8)
            model.caption_pixels(pixels, beam_size=int(model.metadata["beam_size"]))  # warm up before serving
            scheduler = self._scheduler(model)
            if scheduler is not None:  # its encode/decode_step calls too, alone and merged
                for beam in {1, int(model.metadata["beam_size"])}:
                    scheduler.warm_up(pixels, beam_size=beam, max_length=model.max_length,
                                      length_penalty=float(model.metadata["length_penalty"]))
                self._report(scheduler)  # from now on: the warm-up is no traffic
        except Exception as exc:
            self.last_error = f"cannot load version {version}: {type(exc).__name__}: {exc}"
            log.error(self.last_error)
            return False
        with self._lock:
            self._current = (model, version, scheduler)
        self.last_error = None
        # The loaded model holds its variables and vocabulary in memory; the superseded copy can go.
        self._prune({version})
        log.info("serving %s version %s from %s", self.model_name, version, location)
        return True

    def _scheduler(self, model):
        """A batch scheduler for ``model`` (None: batching off); silent until ``_report``."""
        if not self.batching:
            return None
        from captioner.serving.batching import BatchScheduler

        return BatchScheduler(model, self.batch_max_size, self.batch_timeout_ms / 1000.0,
                              encode_wait_seconds=self.batch_encode_wait_ms / 1000.0)

    def _report(self, scheduler) -> None:
        # Late-bound: the app sets the hooks after constructing the backend.
        scheduler.on_call = lambda signature, seconds: self.on_call and self.on_call(signature, seconds)
        scheduler.on_batch = lambda signature, rows: self.on_batch and self.on_batch(signature, rows)
        scheduler.on_queue = lambda seconds: self.on_queue and self.on_queue(seconds)

    def start(self) -> LocalBackend:
        set_intra_op_threads(self.intra_op_threads)
        self.load_latest()
        if not self.model_dir and self.poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll, name="model-poller", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.load_latest()
        self._prune(set())  # closed: the served model is in memory, its downloaded copy is not needed

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
        model, version, _ = self._model()
        return {"model_name": self.model_name, "version": version, "backend": self.name, "metadata": model.metadata}

    @property
    def image_size(self) -> int:
        return self._model()[0].image_size

    def snapshot(self, request_id: str = "") -> ModelSnapshot:
        """The version served now, kept for the whole request (a swap does not change it)."""
        from captioner.predictor import results_from_decode

        model, version, scheduler = self._model()

        def caption(pixels: np.ndarray, request: DecodeRequest) -> list:
            if scheduler is not None:
                alpha = model.metadata["length_penalty"] if request.length_penalty is None else request.length_penalty
                out, steps = scheduler.decode(pixels, beam_size=request.beam_size, max_length=request.max_length,
                                              length_penalty=float(alpha))
            else:
                started = time.perf_counter()
                out = model.decode_pixels(pixels, beam_size=request.beam_size, max_length=request.max_length,
                                          length_penalty=request.length_penalty)
                steps = int(out["tokens"].shape[-1])
                # encode and every decode_step run inside one in-process graph: one call to time.
                if self.on_call is not None:
                    self.on_call(IN_PROCESS_DECODE, time.perf_counter() - started)
            if self.on_decode is not None:
                self.on_decode(steps)
            return results_from_decode(out, model.vocab, request.with_attention)

        return ModelSnapshot(version, model.metadata, caption)

    def caption(self, pixels: np.ndarray, request: DecodeRequest):
        snapshot = self.snapshot(request.request_id)
        return snapshot.caption(pixels, request), snapshot.version


class TFServingBackend:
    name = "tfserving"
    # What each signature must answer; a response without it is a contract error (502), not a KeyError.
    _expected_outputs = {C.SIG_ENCODE: (C.OUT_FEATURES,), C.SIG_METADATA: (C.OUT_METADATA,),
                         C.SIG_DECODE_STEP: (C.OUT_LOG_PROBS, C.OUT_ATTENTION, C.OUT_STATE)}

    def __init__(self, target: str, model_name: str = "captioner", deadline_seconds: float = 10.0,
                 retries: int = 2, model_label: str = "stable", model_version: int = 0):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.target, self.model_name = target, model_name
        self.deadline_seconds, self.retries = deadline_seconds, retries
        # Which version a request runs on: a fixed number, else the version TF Serving's model config
        # labels `model_label`, else (label not assigned yet) the newest, as the local backend does.
        self.model_label, self.model_version = model_label, int(model_version or 0)
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self.predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._versions: dict[str, tuple[dict[str, Any], list[str]]] = {}  # metadata and vocabulary
        self._meta_lock = threading.Lock()
        self._label_missing = False
        self.on_call: CallHook | None = None
        self.on_decode: DecodeHook | None = None

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
                detail = f"TF Serving at {self.target}: {code.name}: {exc.details()}"
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    raise BackendUnavailable(detail) from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise BackendOverloaded(detail) from None
                # INVALID_ARGUMENT, FAILED_PRECONDITION (e.g. its batcher refused to merge), INTERNAL,
                # UNIMPLEMENTED, ...: the server and this gateway disagree about the model's contract.
                raise BackendContractError(detail) from None

    def _predict(self, signature: str, inputs: dict[str, np.ndarray], deadline: float, request_id: str,
                 version: str | None = None, label: str | None = None, outputs: tuple[str, ...] = ()):
        """One Predict call; returns ``(outputs, the version that answered)``."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature
        if version:
            request.model_spec.version.value = int(version)
        elif label:
            request.model_spec.version_label = label
        request.output_filter.extend(outputs)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        started = time.perf_counter()
        response = self._call(self.predict_stub.Predict, request, deadline, request_id)
        if self.on_call is not None:
            self.on_call(signature, time.perf_counter() - started)
        missing = sorted(set(outputs or self._expected_outputs.get(signature, ())) - set(response.outputs))
        if missing:
            raise BackendContractError(f"TF Serving at {self.target}: {signature} answered without {missing}")
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}, str(response.model_spec.version.value)

    def _resolve(self, deadline: float, request_id: str) -> tuple[str, dict[str, Any], list[str]]:
        """Ask the configured version or label for its metadata: TF Serving answers with the version it
        resolved, which the whole request then uses. The vocabulary is fetched once per version."""
        rows = {C.IN_ROWS: np.zeros([1], np.int32)}
        # Only the small metadata json once some version's vocabulary is known. (A filtered output set
        # is not the signature's, so TF Serving runs it outside its batcher: fine for one row.)
        outputs = (C.OUT_METADATA,) if self._versions else ()
        if self.model_version:
            out, version = self._predict(C.SIG_METADATA, rows, deadline, request_id, str(self.model_version),
                                         outputs=outputs)
        else:
            try:
                out, version = self._predict(C.SIG_METADATA, rows, deadline, request_id, label=self.model_label,
                                             outputs=outputs)
                self._label_missing = False
            except Exception as exc:
                # "Unrecognized servable version label": nothing promoted yet (or TF Serving has not
                # re-read its model config). Serve the newest, as the local backend does.
                if not self.model_label or "version label" not in str(exc):
                    raise
                if not self._label_missing:
                    log.warning("TF Serving has no version labelled %r for %s: serving the newest",
                                self.model_label, self.model_name)
                self._label_missing = True
                out, version = self._predict(C.SIG_METADATA, rows, deadline, request_id, outputs=outputs)
        with self._meta_lock:
            known = self._versions.get(version)
        if known is None:
            if C.OUT_VOCAB not in out:
                out, _ = self._predict(C.SIG_METADATA, rows, deadline, request_id, version)
            known = (json.loads(out[C.OUT_METADATA][0]), [t.decode() for t in out[C.OUT_VOCAB][0]])
            with self._meta_lock:
                self._versions[version] = known
        return version, known[0], known[1]

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

    def snapshot(self, request_id: str = "") -> ModelSnapshot:
        """Resolve the label (or version) once; ``caption`` sends encode and every decode_step to that
        version, so a label moved mid-request cannot mix two models in one caption."""
        version, metadata, vocab = self._resolve(time.monotonic() + self.deadline_seconds, request_id or "-")
        snapshot = ModelSnapshot(version, metadata, lambda pixels, request: [])

        def caption(pixels: np.ndarray, request: DecodeRequest) -> list:
            nonlocal vocab
            try:
                return self._caption(snapshot.version, snapshot.metadata, vocab, pixels, request)
            except BackendUnavailable as exc:
                # The version was unloaded under this request (its label moved on and the model
                # config no longer serves it): start again, whole, on the version serving now.
                if "NOT_FOUND" not in str(exc):
                    raise
                version, metadata, vocab = self._resolve(time.monotonic() + self.deadline_seconds,
                                                         request.request_id or "-")
                if version == snapshot.version or int(metadata["input_size"]) != snapshot.image_size:
                    raise
                log.info("request %s: version %s was unloaded mid-request; decoding again on %s",
                         request.request_id, snapshot.version, version)
                snapshot.version, snapshot.metadata = version, metadata
                return self._caption(version, metadata, vocab, pixels, request)

        snapshot.caption = caption
        return snapshot

    def info(self) -> dict[str, Any]:
        snapshot = self.snapshot("model-info")
        return {"model_name": self.model_name, "version": snapshot.version, "backend": self.name,
                "target": self.target, "label": None if self.model_version else self.model_label,
                "metadata": snapshot.metadata}

    @property
    def image_size(self) -> int:
        return self.snapshot("image-size").image_size

    def caption(self, pixels: np.ndarray, request: DecodeRequest):
        snapshot = self.snapshot(request.request_id)
        return snapshot.caption(pixels, request), snapshot.version

    def _caption(self, version: str, metadata: dict[str, Any], vocab: list[str], pixels: np.ndarray,
                 request: DecodeRequest) -> list:
        from captioner.predictor import decode_images, results_from_decode

        deadline = time.monotonic() + self.deadline_seconds
        steps = 0

        def encode(images):
            out, _ = self._predict(C.SIG_ENCODE, {C.IN_IMAGES: np.asarray(images, np.uint8)}, deadline,
                                   request.request_id, version)
            return out[C.OUT_FEATURES]

        def step(features, tokens, state, position):
            nonlocal steps
            steps += 1
            out, _ = self._predict(C.SIG_DECODE_STEP, {C.IN_FEATURES: np.asarray(features, np.float32),
                                                       C.IN_TOKENS: np.asarray(tokens, np.int32),
                                                       C.IN_STATE: np.asarray(state, np.float32),
                                                       C.IN_POSITION: np.asarray(position, np.int32)},
                                   deadline, request.request_id, version)
            return out[C.OUT_LOG_PROBS], out[C.OUT_ATTENTION], out[C.OUT_STATE]

        alpha = metadata["length_penalty"] if request.length_penalty is None else request.length_penalty
        out = decode_images(encode, step, pixels, num_regions=int(metadata["num_regions"]),
                            state_shape=metadata["state_shape"], beam_size=request.beam_size,
                            max_length=request.max_length, length_penalty=float(alpha),
                            no_repeat_ngram_size=int(metadata.get("no_repeat_ngram_size", 0)))
        if self.on_decode is not None:
            self.on_decode(steps)
        return results_from_decode({k: np.asarray(v) for k, v in out.items()}, vocab, request.with_attention)


def set_intra_op_threads(threads: int) -> int:
    """Let each TensorFlow op of this process use ``threads`` threads (0: leave TensorFlow's default),
    before TensorFlow starts its runtime; returns the count in effect (0: TensorFlow's default). Once
    the runtime runs (the gateway inside a process that used TensorFlow already, as in tests) it can
    no longer change: a warning says so, and the gateway serves with what is set."""
    import tensorflow as tf

    current = tf.config.threading.get_intra_op_parallelism_threads()
    if threads <= 0 or threads == current:
        return current
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        log.warning("TensorFlow's runtime already runs: ops keep %s threads (CAPTIONER_INTRA_OP_THREADS=%d not "
                    "applied)", current or "TensorFlow's default number of", threads)
        return current
    return threads


def make_backend(settings):
    if settings.backend == "tfserving":
        return TFServingBackend(settings.tfserving_target, settings.model_name, settings.deadline_seconds,
                                settings.retries, getattr(settings, "model_label", "stable"),
                                getattr(settings, "model_version", 0))
    return LocalBackend(settings.model_repo, settings.model_name, settings.model_dir, settings.poll_seconds,
                        batching=getattr(settings, "batching", False),
                        batch_max_size=getattr(settings, "batch_max_size", 128),
                        batch_timeout_ms=getattr(settings, "batch_timeout_ms", 1.0),
                        batch_encode_wait_ms=getattr(settings, "batch_encode_wait_ms", 0.0),
                        intra_op_threads=getattr(settings, "intra_op_threads", 0))
