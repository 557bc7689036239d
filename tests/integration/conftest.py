"""Fixtures and helpers shared by the gateway tests."""

import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from captioner.serving.app import create_app
from captioner.serving.settings import Settings

from captioner.registry import ModelRepository
from captioner.workflow import load_data


@pytest.fixture(scope="session")
def repo(smoke_run, tmp_path_factory):
    out, _ = smoke_run
    root = tmp_path_factory.mktemp("repo")
    ModelRepository(root).publish("captioner", out / "saved_model", {"metrics": {"bleu4": 0.3}})
    return root


@pytest.fixture(scope="session")
def client(repo):
    app = create_app(Settings(model_repo=str(repo), poll_seconds=0, log_requests=False, api_key=""))
    return app.test_client()


@pytest.fixture(scope="session")
def test_images(smoke_run):
    _, cfg = smoke_run
    data = load_data(cfg)
    return [data.image_path(i) for i in data.splits["test"][:6]]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server started as a subprocess."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, seconds: float = 120, process: subprocess.Popen | None = None) -> None:
    """Poll ``url``/ready until it answers 200; fail after ``seconds`` or as soon as ``process`` exits
    (a server that crashed at start-up will never get ready)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server for {url} exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.HTTPError, OSError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready within {seconds}s")


def stop_process(process: subprocess.Popen) -> None:
    """Stop a server the test started: politely, then for sure."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@pytest.fixture
def live_gateway(repo):
    """The gateway app over the smoke repository, served in this process on a free port."""
    from werkzeug.serving import make_server

    app = create_app(Settings(model_repo=str(repo), poll_seconds=0, log_requests=False))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
