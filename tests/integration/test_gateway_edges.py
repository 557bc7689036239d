"""Gateway edges: backend failures map to documented statuses, CORS preflights with an API key, several
keys compared in constant time, per-signature metrics, an oversize upload's 413 reaching a client that
writes its whole body first, and the model-version gauge after a worker dies."""

import hmac
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from captioner.serving.app import create_app
from captioner.serving.backends import BackendContractError, BackendOverloaded
from captioner.serving.settings import Settings
from PIL import Image

from captioner.registry import ModelRepository, ModelVersionManager
from tests.integration.conftest import free_port, stop_process, wait_ready

pytestmark = pytest.mark.integration
ORIGIN = "https://example.com"


def small_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def post_image(client, **kw):
    return client.post("/predict", data={"file": (io.BytesIO(small_jpeg()), "a.jpg")},
                       content_type="multipart/form-data", **kw)


def no_model_app(tmp_path, **settings):
    """An app whose key check runs before anything else: 503 (no model) means the key was accepted."""
    return create_app(Settings(model_repo=str(tmp_path / "empty"), poll_seconds=0, log_requests=False, **settings))


# -- backend failures ---------------------------------------------------------------------------------
@pytest.fixture
def failing_tfserving():
    """A real gRPC PredictionService that aborts every call with the code in ``state["code"]``."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    state = {"code": grpc.StatusCode.INTERNAL}

    class Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            context.abort(state["code"], f"injected {state['code'].name}")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Prediction(), server)
    server.start()
    yield state, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize("code, status", [
    ("RESOURCE_EXHAUSTED", 503), ("INVALID_ARGUMENT", 502), ("INTERNAL", 502), ("UNIMPLEMENTED", 502),
    ("FAILED_PRECONDITION", 502)])
def test_grpc_errors_from_tf_serving_are_not_500(failing_tfserving, code, status):
    state, target = failing_tfserving
    state["code"] = getattr(grpc.StatusCode, code)
    app = create_app(Settings(backend="tfserving", tfserving_target=target, retries=0, deadline_seconds=5,
                              log_requests=False))
    client = app.test_client()
    for response in (post_image(client), client.get("/model/info")):
        assert response.status_code == status, (code, response.status_code, response.json)
        assert code in response.json["error"] and response.json["request_id"]
        assert ("Retry-After" in response.headers) == (status == 503)
    kind = "backend_overloaded" if status == 503 else "backend_contract"
    assert f'captioner_errors_total{{kind="{kind}"}} 2.0' in client.get("/metrics").data.decode()


def test_a_response_without_the_signature_outputs_is_a_contract_error():
    """TF Serving answering a Predict without the outputs the signature promises (a model of another
    shape under the same name) is the backend breaking the contract: 502, not a KeyError's 500."""
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    class Empty(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            response = predict_pb2.PredictResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = 1
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Empty(), server)
    server.start()
    try:
        app = create_app(Settings(backend="tfserving", tfserving_target=f"127.0.0.1:{port}", retries=0,
                                  deadline_seconds=5, log_requests=False))
        response = app.test_client().get("/model/info")
        assert response.status_code == 502 and "metadata_json" in response.json["error"], response.json
    finally:
        server.stop(None)


class FailingBackend:
    """A backend whose every model call raises ``exc``: the app's side of the backend contract."""

    name = "failing"

    def __init__(self, exc: Exception):
        self.exc = exc

    def start(self):
        return self

    def ready(self):
        return False, str(self.exc)

    def info(self):
        raise self.exc

    def caption(self, pixels, request):
        raise self.exc


def test_overloaded_is_503_with_retry_after_and_contract_error_is_502():
    client = create_app(Settings(log_requests=False), backend=FailingBackend(
        BackendOverloaded("queue full", retry_after=3))).test_client()
    response = post_image(client)
    assert response.status_code == 503 and response.headers["Retry-After"] == "3"
    assert "overloaded" in response.json["error"] and "queue full" in response.json["error"]
    client = create_app(Settings(log_requests=False), backend=FailingBackend(
        BackendContractError("decode_step answered no log_probs"))).test_client()
    response = client.get("/model/info")
    assert response.status_code == 502 and "log_probs" in response.json["error"]


# -- CORS and API keys --------------------------------------------------------------------------------
def test_cors_preflight_needs_no_key_and_the_call_still_does(tmp_path):
    client = no_model_app(tmp_path, cors_origins=(ORIGIN,), api_key="sekret").test_client()
    preflight = client.options("/predict", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, content-type"})
    assert preflight.status_code == 200, preflight.data
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "x-api-key" in preflight.headers["Access-Control-Allow-Headers"].lower()
    refused = post_image(client, headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert post_image(client, headers={"Origin": ORIGIN, "X-API-Key": "sekret"}).status_code == 503  # no model


def test_several_api_keys_for_rotation(tmp_path):
    settings = Settings.from_env({
        "CAPTIONER_API_KEY": "old-key, new-key", "CAPTIONER_API_KEYS": "third-key",
        "CAPTIONER_MODEL_REPO": str(tmp_path / "empty"), "CAPTIONER_POLL_SECONDS": "0",
        "CAPTIONER_LOG_REQUESTS": "false"})
    client = create_app(settings).test_client()
    for key in ("old-key", "new-key", "third-key"):
        assert client.get("/model/info", headers={"X-API-Key": key}).status_code == 503, key
    for key in ("old-key, new-key", "old", "new-keyx", "é"):
        assert client.get("/model/info", headers={"X-API-Key": key}).status_code == 401, key
    assert client.get("/model/info").status_code == 401
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("name", ["HEADER_TIMEOUT_SECONDS", "CLIENT_TIMEOUT_SECONDS", "MAX_CONNECTIONS"])
def test_server_limits_must_be_positive(name):
    with pytest.raises(ValueError, match=f"CAPTIONER_{name}=0"):
        Settings.from_env({f"CAPTIONER_{name}": "0"})


def test_api_keys_are_compared_in_constant_time(tmp_path, monkeypatch):
    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    client = no_model_app(tmp_path, api_keys=("k1", "k2")).test_client()
    assert client.get("/model/info", headers={"X-API-Key": "k1"}).status_code == 503
    # Every key is compared, even after a match: the time does not tell which key matched.
    assert compared == [(b"k1", b"k1"), (b"k1", b"k2")]


# -- metrics hooks ------------------------------------------------------------------------------------
def test_backend_hooks_feed_per_signature_latency_and_decode_steps(tmp_path):
    app = no_model_app(tmp_path)
    backend = app.extensions["captioner"]["backend"]
    backend.on_call("encode", 0.02)
    backend.on_call("decode_step", 0.003)
    backend.on_call("decode_step", 0.004)
    backend.on_call("metadata", 0.001)
    backend.on_decode(7)
    text = app.test_client().get("/metrics").data.decode()
    assert 'captioner_backend_call_seconds_count{signature="encode"} 1.0' in text
    assert 'captioner_backend_call_seconds_count{signature="decode_step"} 2.0' in text
    assert 'captioner_backend_call_seconds_count{signature="metadata"} 1.0' in text
    assert "captioner_decode_steps_count 1.0" in text and "captioner_decode_steps_sum 7.0" in text


def test_tf_serving_calls_are_timed_per_signature(repo):
    """Over a real gRPC server, one /predict feeds the metadata, encode and decode_step histograms."""
    from captioner.serving.grpc_server import ModelServer

    from captioner import constants as C

    server = ModelServer(repo).start()
    try:
        client = create_app(Settings(backend="tfserving", tfserving_target=server.target, log_requests=False,
                                     deadline_seconds=20)).test_client()
        response = post_image(client, query_string={"algorithm": "greedy", "max_length": "5"})
        assert response.status_code == 200, response.json
        text = client.get("/metrics").data.decode()
    finally:
        server.stop()
    for signature in (C.SIG_METADATA, C.SIG_ENCODE, C.SIG_DECODE_STEP):
        assert f'captioner_backend_call_seconds_count{{signature="{signature}"}}' in text, signature
    assert "captioner_decode_steps_count 1.0" in text


# -- `captioner serve` over two workers ---------------------------------------------------------------
def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


UPLOAD_LIMIT = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def served(smoke_run, tmp_path_factory):
    """`captioner serve --workers 2` over a repository with versions 1 and 2 (2 served: no label)."""
    out, _ = smoke_run
    root = tmp_path_factory.mktemp("edges-repo")
    repo = ModelRepository(root)
    repo.publish("captioner", out / "saved_model", {"metrics": {}})
    copy = tmp_path_factory.mktemp("v2") / "saved_model"
    shutil.copytree(out / "saved_model", copy)
    (copy / "assets.extra" / "marker").write_text("v2")
    repo.publish("captioner", copy, {"metrics": {}})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMETHEUS_", "CAPTIONER_"))}
    env.update(CAPTIONER_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT), CAPTIONER_POLL_SECONDS="3600",
               CAPTIONER_LOG_REQUESTS="false")
    server = subprocess.Popen([sys.executable, "-m", "captioner.cli", "serve", "--model-repo", str(root),
                               "--port", str(port), "--workers", "2", "--threads", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process=server)
        yield server, url, root
    finally:
        stop_process(server)


def test_oversize_upload_413_reaches_a_client_that_writes_everything_first(served):
    """urllib sends the whole body before reading: closing on unread bytes would reset the connection
    (a broken pipe) instead of delivering the 413."""
    _, url, _ = served
    for size in (UPLOAD_LIMIT + 1, int(UPLOAD_LIMIT * 1.8)):
        request = urllib.request.Request(url + "/predict", data=b"0" * size, method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == 413, size
        assert f"larger than {UPLOAD_LIMIT} bytes" in json.loads(caught.value.read())["error"]
    assert _get(url + "/health")[0] == 200


def _version_gauge(url: str) -> float:
    text = _get(url + "/metrics")[1].decode()
    return float(next(line for line in text.splitlines()
                      if line.startswith('captioner_model_version{model="captioner"}')).split()[-1])


def test_version_gauge_forgets_dead_workers(served):
    """Workers serve version 2, version 1 is promoted (a rollback) and the workers die; their
    replacements serve 1 and the gauge says 1, not a dead worker's 2."""
    server, url, root = served
    for _ in range(8):
        assert json.loads(_get(url + "/model/info")[1])["version"] == "2"
    assert _version_gauge(url) == 2
    ModelVersionManager(root).promote(1)
    old = _children(server.pid)
    assert len(old) == 2
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (len(_children(server.pid) - old) < 2 or _children(server.pid) & old):
        time.sleep(0.2)
    wait_ready(url, process=server)
    for _ in range(8):
        assert json.loads(_get(url + "/model/info")[1])["version"] == "1"
    assert _version_gauge(url) == 1
