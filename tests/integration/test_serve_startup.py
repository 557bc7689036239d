"""Issue #10 item 8: `captioner serve` says at start when there is nothing to serve, fails clearly on a
port in use, and prints the address it really listens on (also for --port 0) once listening; and it
prints no TensorFlow start-up noise. Driven as a user does: the `captioner` entry point in a subprocess."""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import stop_process, wait_ready
from tests.integration.test_first_hour_quiet import NOISE

CAPTIONER = str(Path(sys.executable).with_name("captioner"))
BANNER = re.compile(r"(http://127\.0\.0\.1:(\d+))/ .*demo page: (http://127\.0\.0\.1:\d+/demo)")


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, queue.Queue, Path]:
    """``captioner serve ARGS`` with stdout lines in a queue and stderr in a file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP_", "CAPTIONER_"))}
    env["CAPTIONER_POLL_SECONDS"] = "1"
    stderr = tmp_path / "stderr.txt"
    process = subprocess.Popen([CAPTIONER, "serve", *args], env=env, stdout=subprocess.PIPE,
                               stderr=stderr.open("w"), text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    return process, lines, stderr


def _banner(process: subprocess.Popen, lines: queue.Queue, stderr: Path, seconds: float = 120) -> re.Match:
    try:
        line = lines.get(timeout=seconds)
    except queue.Empty:
        raise AssertionError(f"no banner within {seconds}s; exit code {process.poll()}; stderr:\n"
                             f"{stderr.read_text()[-3000:]}") from None
    match = BANNER.search(line)
    assert match, f"banner without the real address and demo page: {line!r}"
    return match


def test_empty_repository_warns_and_port_zero_shows_the_real_port(tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    process, lines, stderr = _start(tmp_path, "--model-repo", str(empty), "--port", "0")
    try:
        match = _banner(process, lines, stderr)
        url, port = match.group(1), int(match.group(2))
        assert port != 0
        with urllib.request.urlopen(url + "/health", timeout=30) as response:  # it is the address served
            assert response.status == 200
        assert match.group(3) == url + "/demo"
        warning = stderr.read_text()
        assert f"model repository {empty.resolve()} has no version of 'captioner'" in warning, warning
    finally:
        stop_process(process)


def test_missing_repository_warns_at_start(tmp_path):
    missing = tmp_path / "no-such-repo"
    process, lines, stderr = _start(tmp_path, "--model-repo", str(missing), "--port", "0")
    try:
        _banner(process, lines, stderr)
        assert f"model repository {missing.resolve()} does not exist" in stderr.read_text()
    finally:
        stop_process(process)


def test_port_in_use_is_a_clear_error_and_no_banner(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([CAPTIONER, "serve", "--model-repo", str(tmp_path), "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr, result.stderr
    assert "serving" not in result.stdout, result.stdout


def test_serving_a_model_prints_no_warning_and_no_tensorflow_noise(repo, tmp_path):
    process, lines, stderr = _start(tmp_path, "--model-repo", str(repo), "--port", "0")
    try:
        url = _banner(process, lines, stderr).group(1)
        wait_ready(url, process=process)  # the worker has imported TensorFlow and loaded the model
    finally:
        stop_process(process)
    text = stderr.read_text()
    assert "warning:" not in text, text
    found = {name: p.search(text).group(0) for name, p in NOISE.items() if p.search(text)}
    assert not found, f"gateway stderr has noise: {found}\n{text[-3000:]}"


@pytest.mark.parametrize("bad", ["no-such-folder", "empty-folder"])
def test_model_dir_without_a_savedmodel_warns(tmp_path, bad):
    folder = tmp_path / bad
    if bad == "empty-folder":
        folder.mkdir()
    process, lines, stderr = _start(tmp_path, "--model-dir", str(folder), "--port", "0")
    try:
        _banner(process, lines, stderr)
        expected = "does not exist" if bad == "no-such-folder" else "is not a SavedModel folder"
        assert f"--model-dir {folder.resolve()} {expected}" in stderr.read_text()
    finally:
        stop_process(process)
