"""Issue #10 item 3: `captioner` commands do not print TensorFlow's, Keras' or pycocoevalcap's internal
noise on stderr, and `captioner --verbose` shows TensorFlow's own logs again.

Driven as a user does: the installed `captioner` entry point in a subprocess, with an environment in
which no TF_CPP_MIN_LOG_LEVEL was set (the test session sets one for itself)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CAPTIONER = str(Path(sys.executable).with_name("captioner"))

#: What the issue quotes, one pattern per kind of noise.
NOISE = {
    "absl pre-init notice": re.compile(r"absl::InitializeLog"),
    "C++ log line (oneDNN, CUDA, cuInit, AVX)": re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]", re.M),
    "cuInit": re.compile(r"cuInit"),
    "oneDNN": re.compile(r"oneDNN"),
    "AVX": re.compile(r"AVX"),
    "Keras out-of-data warning": re.compile(r"ran out of data"),
    "Python warning": re.compile(r"\w+Warning: "),
    "Meteor.__del__ traceback": re.compile(r"Meteor\.__del__|object has no attribute 'stdin'|Exception ignored"),
    "traceback": re.compile(r"Traceback \(most recent call last\)"),
    "PTB tokenizer status": re.compile(r"PTBTokenizer tokenized"),
}


def _user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP_", "CAPTIONER_VERBOSE"))}


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([CAPTIONER, *args], env=_user_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"captioner {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result


def _assert_quiet(stderr: str, command: str) -> None:
    found = {name: pattern.search(stderr).group(0) for name, pattern in NOISE.items() if pattern.search(stderr)}
    assert not found, f"`captioner {command}` printed noise on stderr: {found}\n--- stderr ---\n{stderr[-3000:]}"


def test_train_prints_no_tensorflow_or_keras_noise(tmp_path):
    # One cross-entropy epoch through Keras' fit (where "ran out of data" came from), then the test
    # evaluation and the export, as `captioner train` runs them.
    result = _run("train", "--config", "smoke", "--output", str(tmp_path / "run"), "--set", "train.epochs=1",
                  "--set", "scst.enabled=false")
    _assert_quiet(result.stderr, "train --config smoke")


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java, which is not installed")
def test_evaluate_with_meteor_exits_without_a_traceback(smoke_run, tmp_path):
    run, _ = smoke_run
    report = tmp_path / "report.json"
    # Quoted: a bare `on` is YAML for true.
    result = _run("evaluate", "--model", str(run), "--set", 'eval.meteor="on"', "--output", str(report))
    assert json.loads(report.read_text())["meteor"] is not None  # METEOR did run, so its scorer was released
    _assert_quiet(result.stderr, "evaluate --set eval.meteor=on")


def test_caption_is_quiet_and_verbose_shows_tensorflow_logs(smoke_run):
    from captioner.workflow import load_data

    run, cfg = smoke_run
    data = load_data(cfg)  # the synthetic images the run was trained on
    image = data.image_path(data.splits["test"][0])
    model = run / "saved_model"
    quiet = _run("caption", "--model", str(model), str(image))
    assert str(image) in quiet.stdout
    _assert_quiet(quiet.stderr, "caption")

    verbose = _run("--verbose", "caption", "--model", str(model), str(image))
    assert str(image) in verbose.stdout
    assert NOISE["absl pre-init notice"].search(verbose.stderr) or NOISE[
        "C++ log line (oneDNN, CUDA, cuInit, AVX)"].search(verbose.stderr), (
        f"--verbose should show TensorFlow's own start-up logs; stderr was:\n{verbose.stderr[-3000:]}")
