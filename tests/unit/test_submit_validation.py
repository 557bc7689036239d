"""`captioner pipeline submit/schedule` check what they can here, before any client talks to a host
(issue #10, item 5), and send the resolved config, not a path that exists only on this machine.

The host is a stand-in Kubeflow Pipelines API server on 127.0.0.1 that records each request and
answers as the KFP v2beta1 REST API does; the real ``kfp.Client`` talks to it over HTTP.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from captioner.pipelines import deploy
from captioner.pipelines.pipeline import DEFAULT_IMAGE
from captioner.pipelines.step_config import load_step_config

from captioner.cli import main
from captioner.config import load_config
from captioner.errors import CaptionerError

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


class FakeKfp(BaseHTTPRequestHandler):
    requests: list = []

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - the http.server API
        self.requests.append(("GET", self.path, None))
        if self.path.startswith("/apis/v2beta1/healthz"):
            self._answer({"multi_user": False})
        elif self.path.startswith("/apis/v2beta1/experiments"):
            self._answer({"experiments": [{"experiment_id": "exp-1", "display_name": "captioner"}],
                          "total_size": 1})
        else:
            self._answer({})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.requests.append(("POST", self.path, body))
        if self.path.startswith("/apis/v2beta1/runs"):
            self._answer({"run_id": "run-42", "display_name": body.get("display_name")})
        elif self.path.startswith("/apis/v2beta1/recurringruns"):
            self._answer({"recurring_run_id": "rr-7", "display_name": body.get("display_name")})
        else:
            self._answer({"experiment_id": "exp-1"})

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_host(monkeypatch, tmp_path):
    # kfp.Client reads (and may write) its context file under HOME: keep it out of the user's.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    FakeKfp.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeKfp.requests
    server.shutdown()
    server.server_close()


def run(capsys, *args: str):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


SUBMIT = ("pipeline", "submit", "--model-repo", "gs://bucket/models")


def test_bad_config_is_reported_before_the_host_is_asked(kfp_host, capsys, tmp_path):
    host, requests = kfp_host
    code, out, err = run(capsys, *SUBMIT, "--host", host, "--config", "nope")
    assert code == 2 and "unknown preset 'nope'" in err, err
    code, _, err = run(capsys, *SUBMIT, "--host", host, "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "config file not found" in err and "missing.yaml" in err, err
    code, _, err = run(capsys, *SUBMIT, "--host", host, "--config", "smoke", "--set", "train.epochs=many")
    assert code == 2 and "train.epochs" in err, err
    code, _, err = run(capsys, *SUBMIT, "--host", host, "--config", "smoke", "--set", "train.epoch=3")
    assert code == 2 and "unknown field 'train.epoch'" in err, err
    assert requests == []


@pytest.mark.parametrize("cron, expected", [
    ("every monday", "expected 5 fields"),
    ("every monday at 3 am", "minute field 'every'"),
    ("61 3 * * 1", "minute field '61'"),
    ("0 3 * * funday", "day of week field 'funday'"),
    ("0 3 * 13 1", "month field '13'"),
    ("0 3 */0 * *", "day of month field '*/0'"),
])
def test_bad_cron_is_reported_before_the_host_is_asked(kfp_host, capsys, cron, expected):
    host, requests = kfp_host
    code, out, err = run(capsys, "pipeline", "schedule", "--cron", cron, "--host", host, "--config", "smoke",
                         "--model-repo", "gs://bucket/models")
    assert code == 2 and expected in err and "--cron" in err, err
    assert requests == [] and "scheduled" not in out


def test_bad_package_is_reported_before_the_host_is_asked(kfp_host, capsys, tmp_path):
    host, requests = kfp_host
    code, _, err = run(capsys, *SUBMIT, "--host", host, "--package", str(tmp_path / "nope.yaml"))
    assert code == 2 and "compiled pipeline not found" in err and "nope.yaml" in err, err
    notes = tmp_path / "notes.yaml"
    notes.write_text("shopping: [milk, bread]\n")
    code, _, err = run(capsys, *SUBMIT, "--host", host, "--package", str(notes))
    assert code == 2 and "not a compiled KFP pipeline" in err, err
    broken = tmp_path / "broken.yaml"
    broken.write_text("root: {dag: [unclosed\n")
    code, _, err = run(capsys, *SUBMIT, "--host", host, "--package", str(broken))
    assert code == 2 and "invalid YAML" in err, err
    assert requests == []


def test_vertex_checks_its_options_before_any_cloud_call(capsys):
    code, _, err = run(capsys, *SUBMIT, "--vertex", "--project", "p", "--region", "us-central1",
                       "--pipeline-root", "/local/root")
    assert code == 2 and "gs://" in err, err
    code, _, err = run(capsys, "pipeline", "schedule", "--cron", "0 3 * * * 1", "--vertex", "--project", "p",
                       "--region", "us-central1", "--pipeline-root", "gs://b/root", "--model-repo", "gs://m")
    assert code == 2 and "expected 5 fields" in err, err


def test_a_config_file_reaches_the_cluster_resolved(kfp_host, capsys, tmp_path):
    """The run's parameters carry the resolved config: the cluster never needs my.yaml."""
    host, requests = kfp_host
    mine = tmp_path / "my.yaml"
    mine.write_text("extends: smoke\ntrain: {epochs: 7}\ndecode: {beam_size: 3}\n")
    code, out, err = run(capsys, *SUBMIT, "--host", host, "--config", str(mine), "--set", "train.batch_size=16",
                         "--image", "registry.example/components@sha256:" + "a" * 64)
    assert code == 0 and "submitted: run-42" in out, err
    assert "warning" not in err
    (_, _, body), = [r for r in requests if r[0] == "POST" and r[1].startswith("/apis/v2beta1/runs")]
    params = body["runtime_config"]["parameters"]
    assert params["overrides"] == [] and str(mine) not in json.dumps(params)
    expected = load_config(str(mine), ["train.batch_size=16"])
    mine.unlink()  # what runs on the cluster has no my.yaml
    cfg = load_step_config(params["config"], params["overrides"])
    assert cfg == expected and cfg.name == "my" and cfg.train.epochs == 7 and cfg.train.batch_size == 16
    assert body["display_name"] == "captioner-training-my"
    # The compiled package sent is pinned to the image asked for.
    executors = body["pipeline_spec"]["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {
        "registry.example/components@sha256:" + "a" * 64}


def test_placeholder_image_is_warned_about(kfp_host, capsys, tmp_path):
    host, requests = kfp_host
    code, out, err = run(capsys, *SUBMIT, "--host", host, "--config", "smoke")
    assert code == 0 and "submitted: run-42" in out
    assert "warning: no --image" in err and DEFAULT_IMAGE in err, err
    # A package compiled with the placeholder is warned about too; one pinned elsewhere is not.
    code, out, err = run(capsys, "pipeline", "schedule", "--cron", "0 3 * * 1", "--host", host, "--config", "smoke",
                         "--model-repo", "gs://m", "--package", str(ROOT / "pipeline.yaml"))
    assert code == 0 and "scheduled: rr-7" in out and "warning: no --image" in err, err
    (_, _, body), = [r for r in requests if r[0] == "POST" and r[1].startswith("/apis/v2beta1/recurringruns")]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    pinned = tmp_path / "pinned.yaml"
    assert main(["pipeline", "compile", "--output", str(pinned), "--image", "registry.example/c:1"]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, *SUBMIT, "--host", host, "--package", str(pinned))
    assert code == 0 and "warning" not in err, err


def test_cron_forms_each_scheduler_takes():
    assert deploy.validate_cron("0 3 * * 1") == "0 0 3 * * 1"
    assert deploy.validate_cron("30 0 3 * * MON-FRI") == "30 0 3 * * MON-FRI"
    assert deploy.validate_cron("*/15 2-4 1,15 jan-jun ?") == "0 */15 2-4 1,15 jan-jun ?"
    assert deploy.validate_cron("0 3 * * 1", vertex=True) == "0 3 * * 1"
    assert deploy.validate_cron("TZ=Europe/Paris 0 3 * * 1", vertex=True) == "TZ=Europe/Paris 0 3 * * 1"
    with pytest.raises(CaptionerError, match="for --vertex only"):
        deploy.validate_cron("TZ=Europe/Paris 0 3 * * 1")
    with pytest.raises(CaptionerError, match="hour field '24'"):
        deploy.validate_cron("0 24 * * *")
    with pytest.raises(CaptionerError, match="minute field '5-1'"):
        deploy.validate_cron("5-1 3 * * *")


def test_make_image_weights_copies_the_shared_weights_offline(tmp_path):
    """images/weights/README.md tells users to run `make image-weights`: the target exists and copies."""
    import shutil
    import subprocess

    assert "make image-weights" in (ROOT / "images" / "weights" / "README.md").read_text()
    shared = tmp_path / "shared" / "weights" / "keras" / "models"
    shared.mkdir(parents=True)
    (shared / "mobilenet_7_5_224_tf_no_top.h5").write_bytes(b"\x89HDF\r\n\x1a\n weights")
    out = tmp_path / "out"
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    args = [make, "-s", "-C", str(ROOT), "image-weights", f"IMAGE_WEIGHTS={out}", f"KERAS_HOME={tmp_path / 'keras'}"]
    done = subprocess.run([*args, f"SHARED={tmp_path / 'shared'}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (out / "mobilenet_7_5_224_tf_no_top.h5").read_bytes() == b"\x89HDF\r\n\x1a\n weights"
    missing = subprocess.run([*args, f"SHARED={tmp_path / 'nowhere'}", f"IMAGE_WEIGHTS={tmp_path / 'none'}"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "no ImageNet weight files" in missing.stderr, missing.stderr
    assert str(tmp_path / "nowhere") in missing.stderr and not (tmp_path / "none").exists()


def test_a_package_whose_steps_cannot_read_an_embedded_config_is_refused(kfp_host, capsys, tmp_path):
    """A package compiled before configs were embedded would fail on the cluster: refused here."""
    host, requests = kfp_host
    old = tmp_path / "old.yaml"
    old.write_text((ROOT / "pipeline.yaml").read_text().replace("load_step_config", "load_config"))
    code, _, err = run(capsys, *SUBMIT, "--host", host, "--package", str(old), "--image", "x")
    assert code == 2 and "predate embedded configs" in err and "old.yaml" in err, err
    assert requests == []
