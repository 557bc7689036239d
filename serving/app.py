"""The Flask gateway: ``create_app(settings)`` builds it; nothing happens at import time.

Endpoints: ``GET /`` (service info; the demo page for browsers), ``/demo``, ``/docs`` (this API's
documentation), ``/openapi.json`` (its OpenAPI 3 document, serving/openapi.py: keep it in step),
``/health`` (liveness), ``/ready`` (the model is loaded and answers), ``/metrics`` (Prometheus),
``/model/info`` and ``POST /predict``. Every client error is a 4xx JSON ``{"error", "code",
"request_id"}``: 400 bad parameters, 401 missing API key, 413 too large, 415 not an image, 422
undecodable image. A backend failure is never a bare 500: 502 the model server broke its contract,
503 (with ``Retry-After``) backend down or overloaded, 504 backend timeout. A multi-image
``/predict`` answers per image: each result is a caption or that image's error, 200 while any image
was captioned.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import time
import uuid
from importlib import resources
from typing import Any

import numpy as np
from captioner.serving.backends import (
    BackendContractError,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    DecodeRequest,
    make_backend,
    snapshot_of,
)
from captioner.serving.metrics import GatewayMetrics
from captioner.serving.openapi import build_openapi
from captioner.serving.settings import Settings
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from captioner import constants as C
from captioner.data.images import load_image
from captioner.errors import ImageError, ImageTooLarge, ImageUnsupported

access_log = logging.getLogger("captioner.gateway.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ClientError(Exception):
    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.kind = status, kind


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ClientError(400, f"{name} must be true or false, got {value!r}", "bad_parameter")


def _int(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise ClientError(400, f"{name} must be an integer, got {value!r}", "bad_parameter") from None
    if not low <= number <= high:
        raise ClientError(400, f"{name} must be between {low} and {high}, got {number}", "bad_parameter")
    return number


def _key_matches(given: str, keys: tuple[str, ...]) -> bool:
    """Constant-time check of ``given`` against every key (no early exit: the time does not tell which
    key, or how much of one, matched)."""
    given_bytes = given.encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_bytes, key.encode("utf-8"))
    return matched


# gRPC codes that mean "the model server is there but cannot take this now" / "it is gone".
_GRPC_OVERLOADED = ("RESOURCE_EXHAUSTED",)
_GRPC_UNAVAILABLE = ("UNAVAILABLE", "NOT_FOUND", "CANCELLED", "ABORTED")


def create_app(settings: Settings | None = None, backend=None) -> Flask:
    import grpc

    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.json.sort_keys = False
    metrics = GatewayMetrics()
    backend = backend or make_backend(settings)
    # Per-signature latency and decode steps: the backend calls these hooks (plain attributes, so a
    # backend that never calls them works unchanged).
    backend.on_call = metrics.observe_call
    backend.on_decode = metrics.observe_decode
    backend.on_batch, backend.on_queue = metrics.observe_batch, metrics.observe_queue  # local backend, batching
    backend.start()
    api_keys = settings.keys
    app.extensions["captioner"] = {"settings": settings, "backend": backend, "metrics": metrics}
    if settings.cors_origins:
        from flask_cors import CORS

        CORS(app, origins=list(settings.cors_origins), expose_headers=["X-Request-ID"])
    static = resources.files("captioner.serving").joinpath("static")
    demo_html = static.joinpath("demo.html").read_text(encoding="utf-8").replace(
        "{{MAX_BEAM_SIZE}}", str(settings.max_beam_size)).replace(
        "{{DEFAULT_BEAM_SIZE}}", str(settings.default_beam_size or ""))
    docs_html = static.joinpath("docs.html").read_text(encoding="utf-8")
    openapi_document = build_openapi(settings)

    @app.before_request
    def start():
        header = request.headers.get("X-Request-ID", "")
        g.request_id = header if _REQUEST_ID.match(header) else uuid.uuid4().hex
        g.start = time.perf_counter()
        g.model_version = None
        metrics.in_flight.inc()
        # A CORS preflight (OPTIONS) never carries the key: browsers send it without credentials and
        # refuse the real call if it fails.
        if api_keys and request.method != "OPTIONS" and request.endpoint in ("predict", "model_info") and \
                not _key_matches(request.headers.get("X-API-Key", ""), api_keys):
            return _error(401, "missing or wrong X-API-Key header", "unauthorized")
        return None

    @app.after_request
    def finish(response: Response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
        latency = time.perf_counter() - g.get("start", time.perf_counter())
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(latency)
        if settings.log_requests:
            access_log.info(json.dumps({
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "request_id": g.get("request_id"),
                "method": request.method, "route": endpoint, "status": response.status_code,
                "latency_ms": round(latency * 1000, 2), "model_version": g.get("model_version"),
                "remote": request.remote_addr}))
        return response

    @app.teardown_request
    def done(_exc):
        metrics.in_flight.dec()

    def _error(status: int, message: str, kind: str, retry_after: int | None = None, **extra: Any):
        metrics.errors.labels(kind).inc()
        headers = {"Retry-After": str(max(1, int(retry_after)))} if retry_after is not None else {}
        return jsonify({"error": message, "code": kind, "request_id": g.get("request_id"), **extra}), status, headers

    @app.errorhandler(ClientError)
    def client_error(exc: ClientError):
        return _error(exc.status, str(exc), exc.kind)

    @app.errorhandler(BackendUnavailable)
    def unavailable(exc):
        return _error(503, f"model backend unavailable: {exc}", "backend_unavailable", retry_after=5)

    @app.errorhandler(BackendOverloaded)
    def overloaded(exc):
        return _error(503, f"model backend overloaded: {exc}", "backend_overloaded",
                      retry_after=getattr(exc, "retry_after", 1))

    @app.errorhandler(BackendTimeout)
    def timeout(exc):
        return _error(504, f"model backend timed out: {exc}", "backend_timeout")

    @app.errorhandler(BackendContractError)
    def contract(exc):
        app.logger.error("request %s: model backend broke its contract: %s", g.get("request_id"), exc)
        return _error(502, f"model backend answered wrongly: {exc}", "backend_contract")

    @app.errorhandler(grpc.RpcError)
    def rpc_error(exc: grpc.RpcError):
        # A gRPC error the backend did not translate: classify it by code rather than answer 500.
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        name = getattr(code, "name", "UNKNOWN")
        details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
        message = f"{name}: {details}"
        if name in _GRPC_OVERLOADED:
            return _error(503, f"model backend overloaded: {message}", "backend_overloaded", retry_after=1)
        if name in _GRPC_UNAVAILABLE:
            return _error(503, f"model backend unavailable: {message}", "backend_unavailable", retry_after=5)
        if name == "DEADLINE_EXCEEDED":
            return _error(504, f"model backend timed out: {message}", "backend_timeout")
        app.logger.error("request %s: gRPC error from the model backend: %s", g.get("request_id"), message)
        return _error(502, f"model backend answered wrongly: {message}", "backend_contract")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        kind = {413: "too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.code, "http")
        message = (f"upload larger than {settings.max_upload_bytes} bytes" if exc.code == 413
                   else exc.description or exc.name)
        return _error(exc.code or 400, message, kind)

    @app.errorhandler(Exception)
    def internal(exc: Exception):
        app.logger.exception("request %s failed", g.get("request_id"))
        return _error(500, "internal error", "internal")

    # -- endpoints -----------------------------------------------------------------------------
    @app.get("/")
    def index():
        best = request.accept_mimetypes.best_match(["application/json", "text/html"])
        if best == "text/html" and request.accept_mimetypes["text/html"] > request.accept_mimetypes[
                "application/json"]:
            return Response(demo_html, mimetype="text/html")
        return jsonify({"service": "captioner gateway", "backend": settings.backend,
                        "model_name": settings.model_name, "docs": "/docs", "openapi": "/openapi.json",
                        "endpoints": list(openapi_document["paths"])})

    @app.get("/demo")
    def demo():
        return Response(demo_html, mimetype="text/html")

    @app.get("/docs")
    def docs():
        return Response(docs_html, mimetype="text/html")

    @app.get("/openapi.json")
    def openapi():
        return jsonify(openapi_document)

    @app.get("/health")
    def health():
        return jsonify({"status": "ok", "uptime_seconds": round(time.time() - metrics.start_time, 1)})

    @app.get("/ready")
    def ready():
        ok, detail = backend.ready()
        return jsonify({"ready": ok, "detail": detail, "request_id": g.request_id}), 200 if ok else 503

    @app.get("/metrics")
    def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)

    @app.get("/model/info")
    def model_info():
        info = backend.info()
        g.model_version = info["version"]
        _record_version(info["version"])
        return jsonify(info)

    def _record_version(version: str) -> None:
        if str(version).isdigit():
            metrics.model_version.labels(settings.model_name).set(int(version))

    def _images() -> list[tuple[str, bytes | ClientError]]:
        """The request's images, in order: each one's bytes, or the error that makes it unusable (bad
        base64), so that one bad image does not cost the others their captions."""
        if request.mimetype == "multipart/form-data":
            files = request.files.getlist("file") + request.files.getlist("files")
            if not files:
                raise ClientError(400, "multipart request without a 'file' field", "bad_parameter")
            return [(f.filename or f"file{i}", f.read()) for i, f in enumerate(files)]
        if request.mimetype == "application/json":
            body = request.get_json(silent=True)
            if not isinstance(body, dict):
                raise ClientError(400, "JSON body must be an object with 'image' or 'images'", "bad_parameter")
            items = body.get("images", [body["image"]] if "image" in body else None)
            if not isinstance(items, list) or not items:
                raise ClientError(400, "JSON body needs 'image' (base64) or 'images' (a list)", "bad_parameter")
            out: list[tuple[str, bytes | ClientError]] = []
            for i, item in enumerate(items):
                if not isinstance(item, str):
                    raise ClientError(400, f"images[{i}] must be a base64 string", "bad_parameter")
                try:
                    data: bytes | ClientError = base64.b64decode(
                        item.split(",", 1)[-1] if item.startswith("data:") else item, validate=True)
                except (binascii.Error, ValueError):
                    data = ClientError(400, f"images[{i}] is not valid base64", "bad_base64")
                out.append((f"images[{i}]", data))
            return out
        raise ClientError(415, f"unsupported Content-Type {request.mimetype or 'none'!r}: send multipart/form-data "
                          "with a 'file' field or application/json with a base64 'image'", "unsupported_media_type")

    def _params(model_max_length: int, model_beam_size: int) -> tuple[str, DecodeRequest]:
        source: dict[str, Any] = dict(request.args)
        if request.mimetype == "multipart/form-data":
            source.update(request.form.to_dict())
        elif request.mimetype == "application/json" and isinstance(request.get_json(silent=True), dict):
            source.update({k: v for k, v in request.get_json().items() if k not in ("image", "images")})
        algorithm = str(source.get("algorithm", "beam")).lower()
        if algorithm not in ("greedy", "beam"):
            raise ClientError(400, f"algorithm must be greedy or beam, got {algorithm!r}", "bad_parameter")
        default_beam = settings.default_beam_size or min(model_beam_size, settings.max_beam_size)
        beam_size = _int(source.get("beam_size", default_beam), "beam_size", C.MIN_BEAM_SIZE,
                         settings.max_beam_size)
        if algorithm == "greedy":
            beam_size = 1
        max_length = _int(source.get("max_length", min(model_max_length, settings.max_caption_length)),
                          "max_length", C.MIN_CAPTION_LENGTH, settings.max_caption_length)
        attention = _bool(source.get("return_attention", False), "return_attention")
        return algorithm, DecodeRequest(beam_size, max_length, None, attention, g.request_id)

    @app.post("/predict")
    def predict():
        started = time.perf_counter()
        images = _images()
        if len(images) > settings.max_images:
            raise ClientError(400, f"at most {settings.max_images} images per request, got {len(images)}",
                              "bad_parameter")
        # One model version for the whole request: the input size and length limit checked here are
        # those of the version that decodes.
        model = snapshot_of(backend, g.request_id)
        algorithm, decode = _params(model.max_length, model.beam_size)
        if decode.max_length > model.max_decode_length:
            raise ClientError(400, f"max_length must be at most {model.max_decode_length} for model version "
                              f"{model.version} (its decode state size), got {decode.max_length}", "bad_parameter")
        size = model.image_size
        # Each image is loaded on its own: a bad one becomes an error in its result, the good ones
        # are still captioned (together, in one batch).
        loaded: list[np.ndarray | ClientError] = []
        for name, data in images:
            loaded.append(data if isinstance(data, ClientError) else _load(name, data, size))
        good = [i for i, item in enumerate(loaded) if not isinstance(item, ClientError)]
        failures = {i: item for i, item in enumerate(loaded) if isinstance(item, ClientError)}
        if not good:
            return _all_failed(images, failures)
        for failure in failures.values():
            metrics.errors.labels(failure.kind).inc()
        prepared = time.perf_counter()
        results = iter(model.caption(np.stack([loaded[i] for i in good]), decode))
        version = model.version  # after caption: the version that decoded
        g.model_version = version
        _record_version(version)
        done = time.perf_counter()
        side = int(round(float(model.metadata.get("num_regions", 49)) ** 0.5))
        items = []
        for i, (name, _) in enumerate(images):
            if i in failures:
                items.append({"image": name, "error": _failure(failures[i])})
                continue
            item = {"image": name, **next(results).to_dict(with_attention=decode.with_attention)}
            if decode.with_attention:
                item["attention_grid"] = [side, side]
            items.append(item)
        body: dict[str, Any] = {
            "request_id": g.request_id, "model": {"name": settings.model_name, "version": version},
            "algorithm": algorithm, "beam_size": decode.beam_size, "max_length": decode.max_length}
        if len(images) == 1:
            # One image: its caption fields also at the top level, as before multi-image requests
            # existed. With several, only `results` holds captions: a top-level one would be ambiguous.
            body.update({k: v for k, v in items[0].items() if k != "image"})
        elif decode.with_attention:
            body["attention_grid"] = [side, side]
        body.update({"results": items, "captioned": len(good), "failed": len(failures),
                     "timing_ms": {"preprocess": round((prepared - started) * 1000, 2),
                                   "inference": round((done - prepared) * 1000, 2),
                                   "total": round((done - started) * 1000, 2)}})
        return jsonify(body)

    def _load(name: str, data: bytes, size: int) -> np.ndarray | ClientError:
        try:
            return load_image(data, size, max_pixels=settings.max_pixels, label=name)
        except ImageTooLarge as exc:
            return ClientError(413, str(exc), "image_too_large")
        except ImageUnsupported as exc:
            return ClientError(415, str(exc), "unsupported_image")
        except ImageError as exc:
            return ClientError(422, str(exc), "undecodable_image")

    def _failure(exc: ClientError) -> dict[str, Any]:
        return {"code": exc.kind, "status": exc.status, "message": str(exc)}

    def _all_failed(images: list, failures: dict[int, ClientError]):
        """No image could be captioned: the error status of the images (422 when they differ), the
        first one's message, and every image's error in `results`."""
        statuses = {exc.status for exc in failures.values()}
        first = failures[0]
        status = first.status if len(statuses) == 1 else 422
        message = str(first) if len(images) == 1 else f"no image could be captioned; first: {first}"
        kind = first.kind if len(statuses) == 1 else "no_image_captioned"
        results = [{"image": name, "error": _failure(failures[i])} for i, (name, _) in enumerate(images)]
        return _error(status, message, kind, results=results)

    return app
