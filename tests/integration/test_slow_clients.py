"""Slow clients cannot starve `captioner serve` (issue #8): 64 connections that never finish their headers
and 16 uploads at a few bytes a second, while another client's /health and /predict keep answering.

Before, gunicorn's gthread worker gave each of these connections a thread as soon as its first bytes
arrived, and with its 4 threads taken the gateway answered nothing, /health included.
"""

import io
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from PIL import Image

pytestmark = pytest.mark.integration

HALF_OPEN = 64
TRICKLING = 16
LIVENESS_SECONDS = 6.0
HEADER_TIMEOUT = 10  # seconds the server gives a request's headers: longer than the liveness phase


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _timed(request: urllib.request.Request) -> tuple[int, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.monotonic() - started


@pytest.fixture
def server(repo):
    """`captioner serve` with its defaults (1 worker, 4 threads) on an ephemeral port."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMETHEUS_", "CAPTIONER_"))}
    env.update(CAPTIONER_LOG_REQUESTS="false", CAPTIONER_POLL_SECONDS="0",
               CAPTIONER_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT))
    process = subprocess.Popen([sys.executable, "-m", "captioner.cli", "serve", "--model-repo", str(repo),
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _timed(urllib.request.Request(url + "/ready"))[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the server did not get ready"
            time.sleep(0.3)
        yield port, url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_stalled_and_trickling_clients_do_not_starve_the_gateway(server, test_images):
    port, url = server
    buffer = io.BytesIO()
    Image.open(test_images[0]).convert("RGB").save(buffer, format="JPEG")
    body, content_type = _multipart(buffer.getvalue())

    def predict() -> urllib.request.Request:
        return urllib.request.Request(url + "/predict?algorithm=greedy&max_length=6", data=body,
                                      headers={"Content-Type": content_type}, method="POST")

    # The first call of a kind traces the model's functions; the liveness bound is for the calls after.
    assert _timed(predict())[0] == 200
    sockets: list[socket.socket] = []
    stop = threading.Event()
    try:
        half_open = []
        for _ in range(HALF_OPEN):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: gateway\r\n")  # and never the rest of the headers
            half_open.append(s)
        sockets += half_open

        uploads = []
        for _ in range(TRICKLING):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(f"POST /predict HTTP/1.1\r\nHost: gateway\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode())
            uploads.append(s)
        sockets += uploads

        def trickle():
            """Each upload sends its body 2 bytes at a time, about 4 bytes a second."""
            sent = 0
            while not stop.wait(0.5) and sent < len(body) - 2:
                for s in uploads:
                    s.sendall(body[sent:sent + 2])
                sent += 2

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()

        # Meanwhile another client: each of its calls must answer within 1 s.
        checks = []
        end = time.monotonic() + LIVENESS_SECONDS
        while time.monotonic() < end:
            checks.append(("/health", *_timed(urllib.request.Request(url + "/health"))))
            checks.append(("/predict", *_timed(predict())))
        stop.set()
        trickler.join(5)
        assert len(checks) >= 4
        slow = [(path, status, round(seconds, 2)) for path, status, seconds in checks
                if status != 200 or seconds >= 1.0]
        assert not slow, f"answers that failed or took 1 s or more: {slow}"

        # Headers that never finish are cut at the header timeout: the server closes those sockets.
        deadline = time.monotonic() + HEADER_TIMEOUT + 20
        closed = 0
        for s in half_open:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                closed += s.recv(1024) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        assert closed == HALF_OPEN
    finally:
        stop.set()
        for s in sockets:
            s.close()
