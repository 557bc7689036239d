"""Slow clients cannot starve `captioner serve` (issue #8): 64 connections that never finish their headers
and 16 uploads at a few bytes a second, while another client's /health and /predict keep answering.

Before, gunicorn's gthread worker gave each of these connections a thread as soon as its first bytes
arrived, and with its 4 threads taken the gateway answered nothing, /health included.
"""

import http.client
import io
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid

import pytest
from PIL import Image

from tests.integration.conftest import free_port, stop_process, wait_ready

pytestmark = pytest.mark.integration

HALF_OPEN = 64
TRICKLING = 16
ROUNDS = 10  # /health and /predict pairs measured while the hostile connections are open
LIVE_SECONDS = 1.0  # the bound: "keep answering within 1 s"
HARD_SECONDS = 5.0  # no answer at all may take longer (the client gives up here)
# Seconds the server gives a request's headers. The half-open sockets must outlive the measured rounds,
# which take ~3 s here and at most ~20 s on a server that still meets the bounds below.
HEADER_TIMEOUT = 25


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _round_trip(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                limit: float = HARD_SECONDS) -> tuple[int | None, float]:
    """(status, seconds from sending the request to the end of the answer); status None when the server
    did not answer within ``limit``. Connecting is not timed: the bound is on the server's answer,
    not on this client's set-up."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=limit)
    try:
        connection.connect()
        started = time.perf_counter()
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            response.read()
            return response.status, time.perf_counter() - started
        except (TimeoutError, ConnectionError, http.client.HTTPException):
            return None, time.perf_counter() - started
    finally:
        connection.close()


def _still_open(s: socket.socket) -> bool:
    """True when the peer has neither closed nor reset the socket (nothing to read is expected)."""
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


@pytest.fixture
def server(repo):
    """`captioner serve` with its defaults (1 worker, 4 threads) on an ephemeral port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMETHEUS_", "CAPTIONER_"))}
    env.update(CAPTIONER_LOG_REQUESTS="false", CAPTIONER_POLL_SECONDS="0",
               CAPTIONER_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT))
    process = subprocess.Popen([sys.executable, "-m", "captioner.cli", "serve", "--model-repo", str(repo),
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process=process)
        yield port
    finally:
        stop_process(process)


def test_stalled_and_trickling_clients_do_not_starve_the_gateway(server, test_images):
    """While 64 half-open and 16 trickling connections are open, another client's /health and /predict
    keep answering within 1 s (the issue's bound).

    The bound is the issue's acceptance criterion, so it stays 1 s; what is measured is made fair on a
    loaded 2-core CI machine: only the request's round trip is timed (not connecting or building it),
    and /predict is warmed (its first calls trace the model's functions) before the hostile sockets
    open. /health does no work, so every /health must answer within 1 s. A /predict runs the model on
    a machine other jobs share; one sample in ten may lose the CPU for a second to the scheduler
    without the server being starved, so /predict must answer within 1 s in the median and in at least
    90% of the rounds. Starvation is what the issue is about and is not noise: no call may go
    unanswered for 5 s. The old gthread worker answered nothing here (every call hit the 5 s limit).
    """
    port = server
    buffer = io.BytesIO()
    Image.open(test_images[0]).convert("RGB").save(buffer, format="JPEG")
    body, content_type = _multipart(buffer.getvalue())

    def predict(limit: float = HARD_SECONDS) -> tuple[int | None, float]:
        return _round_trip(port, "POST", "/predict?algorithm=greedy&max_length=6", body,
                           {"Content-Type": content_type}, limit)

    def health(limit: float = HARD_SECONDS) -> tuple[int | None, float]:
        return _round_trip(port, "GET", "/health", limit=limit)

    # Warm-up, not measured: the first calls trace the model's functions, slow on a busy machine.
    for _ in range(3):
        assert predict(limit=120)[0] == 200 and health(limit=120)[0] == 200
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

        healths, predicts = [], []
        for _ in range(ROUNDS):
            healths.append(health())
            predicts.append(predict())
            if healths[-1][0] is None or predicts[-1][0] is None:
                break  # starved: the rest would only wait out the same limit
        # The measurement counts only if the hostile connections were all there throughout.
        assert all(_still_open(s) for s in half_open), "the header timeout cut the half-open sockets early"
        assert all(_still_open(s) for s in uploads), "the server closed the trickling uploads"
        stop.set()
        trickler.join(5)

        def show(samples):
            return [(status, round(seconds, 2)) for status, seconds in samples]

        unanswered = [s for s in healths + predicts if s[0] != 200]
        assert not unanswered, f"failed or no answer within {HARD_SECONDS} s: {show(unanswered)}"
        assert all(seconds < LIVE_SECONDS for _, seconds in healths), f"/health: {show(healths)}"
        times = [seconds for _, seconds in predicts]
        assert statistics.median(times) < LIVE_SECONDS, f"/predict: {show(predicts)}"
        assert sum(t < LIVE_SECONDS for t in times) >= 0.9 * len(times), f"/predict: {show(predicts)}"

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
