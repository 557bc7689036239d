"""Fixtures and helpers shared by the gateway tests, and the local DAG runs shared by the pipeline tests."""

import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture(scope="session")
def dag_history(tmp_path_factory, captioner_cache):
    """The local DAG runs that test_pipeline.py and test_runs_show.py inspect, run once: each run is a
    minute or more of kfp.local steps, and these tests used to repeat the same runs (the first run
    three times, its cached rerun and an untrained candidate twice).

    A scheduled history on a data set of the tests' own (the smoke preset's size and epochs, another
    seed), each run with the same config and overrides:
    ``first``: `captioner pipeline run --local` as a user types it (``cli_output`` is what it printed),
    under a 0.05 floor;
    ``again``: the same run once more, over unchanged data (its steps come from the cache);
    ``changed``: after five new captions (``new_captions``) were added to the data set, under a zero floor;
    ``worse``: an untrained candidate (no epochs, no SCST) on the changed data, under a zero floor.
    ``versions`` holds the registered versions after each run, ``listed`` and ``latest`` are
    `list_runs` and `get_run(latest)` at the end."""
    from captioner.pipelines.local import get_run, list_runs, run_local
    from click.testing import CliRunner

    from captioner.cli import cli
    from captioner.config import SyntheticConfig
    from captioner.data.synthetic import generate

    tmp = tmp_path_factory.mktemp("dag")
    # A model that scores above zero, so that the champion comparisons have something to compare.
    data = generate(tmp / "data", SyntheticConfig(num_train=300, num_dev=24, num_test=24, image_size=64, seed=5))
    overrides = ["data.format=flickr8k", f"data.root={data}", f"features.cache_dir={tmp / 'features'}"]
    root, repo = tmp / "root", str(tmp / "models")
    versions = {}

    def run(name, floor, extra=()):
        record = run_local("smoke", [*overrides, *extra], pipeline_root=root, model_repo=repo, bleu4_floor=floor)
        versions[name] = ModelRepository(repo).versions("captioner")
        return record

    sets = [arg for override in overrides for arg in ("--set", override)]
    result = CliRunner().invoke(cli, ["pipeline", "run", "--local", "--config", "smoke", *sets, "--pipeline-root",
                                      str(root), "--model-repo", repo, "--bleu4-floor", "0.05"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_id = next(line.split()[1] for line in result.output.splitlines() if line.startswith("run: "))
    first = get_run(root, run_id)
    versions["first"] = ModelRepository(repo).versions("captioner")
    again = run("again", 0.05)
    images = (data / "splits" / "train.txt").read_text().split()[:5]
    new_captions = [f"{image}\ta picture with some brand new words\n" for image in images]
    with (data / "captions.tsv").open("a", encoding="utf-8") as handle:
        handle.writelines(new_captions)
    changed = run("changed", 0.0)
    worse = run("worse", 0.0, ["train.epochs=0", "scst.enabled=false"])
    return SimpleNamespace(data=Path(data), overrides=overrides, root=root, repo=repo, run_id=run_id,
                           cli_output=result.output, first=first, again=again, new_captions=new_captions,
                           changed=changed, worse=worse, versions=versions,
                           listed=[r["run_id"] for r in list_runs(root)], latest=get_run(root, "latest")["run_id"])
