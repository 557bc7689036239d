"""Multi-worker training for real: two `captioner train` processes on the loopback interface form a
MultiWorkerMirroredStrategy cluster from TF_CONFIG (worker 0 is the chief), train one model, survive
being killed after epoch 1, and only the chief writes the run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.config import load_config
from captioner.errors import ConfigError
from captioner.train import worker_role
from captioner.workflow import run_training

from .conftest import free_port

pytestmark = pytest.mark.integration

# The smoke preset for two epochs, cross-entropy only (SCST is refused under multi_worker).
TRAIN = ["--config", "smoke", "--set", "scst.enabled=false", "--set", "train.epochs=2"]
# Relative tolerance on each epoch's train and validation loss against one process at the same global
# batch (train.batch_size = 32, split 16 + 16 between the workers). The runs are not bit-identical:
# each worker averages its loss over its own half-batch's tokens and the gradients are averaged over
# workers (a mean of two half-batch means, not the mean over all 32 captions' tokens), the workers draw
# different dropout masks, and the logged loss is the mean of the workers' running means. Measured:
# about 1% apart; between epoch 1 and epoch 2 the loss falls by about 35%, so 5% still catches a run
# that trains on the wrong data, a wrong learning-rate schedule or a restart from scratch.
LOSS_TOLERANCE = 0.05
TIMEOUT = 600  # seconds per launch: a worker whose partner died waits for it, so never wait forever


def _metrics(run: Path) -> list[dict[str, str]]:
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]


def _launch(name: str, output: Path, tmp_path: Path, cache: Path,
            extra_env: dict[str, str]) -> list[tuple[int, int, str]]:
    """Start both workers, wait for both; returns (pid, return code, output) per worker."""
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    procs = []
    try:
        for index in range(2):
            env = dict(os.environ, CAPTIONER_CACHE=str(cache), TMPDIR=str(tmp_path / f"tmp-worker-{index}"),
                       TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                       TF_CPP_MIN_LOG_LEVEL="2", **extra_env)
            Path(env["TMPDIR"]).mkdir(exist_ok=True)
            log = (tmp_path / f"{name}-worker-{index}.log").open("w")
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "captioner.cli", "train", *TRAIN, "--output", str(output),
                 "--set", "train.distribute=multi_worker"],
                stdout=log, stderr=subprocess.STDOUT, env=env), log))
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return [(proc.pid, proc.returncode, (tmp_path / f"{name}-worker-{i}.log").read_text())
            for i, (proc, _) in enumerate(procs)]


@pytest.mark.slow
def test_two_workers_train_like_one_resume_and_only_the_chief_writes(tmp_path, captioner_cache):
    # The reference: one process, the same global batch.
    reference = tmp_path / "single"
    single = subprocess.run([sys.executable, "-m", "captioner.cli", "train", *TRAIN, "--set", "export.enabled=false",
                             "--output", str(reference), "--quiet"], capture_output=True, text=True, timeout=TIMEOUT,
                            env=dict(os.environ, CAPTIONER_CACHE=str(captioner_cache)))
    assert single.returncode == 0, single.stderr[-3000:]

    output, cache = tmp_path / "multi", tmp_path / "cache"  # a fresh cache: the workers prepare the data
    first = _launch("killed", output, tmp_path, cache, {"CAPTIONER_KILL_AFTER_EPOCH": "1"})
    assert [code for _, code, _ in first] == [-9, -9], "\n\n".join(text[-3000:] for _, _, text in first)
    assert [row["epoch"] for row in _metrics(output)] == ["1"]
    # Both generated/read the synthetic data and extracted features into one cache: one at a time, so
    # the backbone ran in one of them and the other found every feature cached.
    assert sum("features (patches)" in text for _, _, text in first) == 1
    # The killed worker's scratch folder is what it left; the run folder has nothing of its own.
    assert list((tmp_path / "tmp-worker-1").glob("captioner-worker-1-*"))

    second = _launch("resumed", output, tmp_path, cache, {})
    assert [code for _, code, _ in second] == [0, 0], "\n\n".join(text[-3000:] for _, _, text in second)
    for _, _, text in second:  # resumed from the chief's checkpoint: epoch 1 is not trained again
        assert "epoch 2:" in text and "epoch 1:" not in text, text[-3000:]
    assert "worker:1: training done; the chief writes the run" in second[1][2]

    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["distribute"] == {"strategy": "multi_worker", "replicas": 2, "workers": 2}
    assert summary["epochs"] == 2
    for name in ("evaluation.json", "model.weights.h5", "checkpoints/best.weights.h5",
                 "checkpoints/backup/latest.weights.h5", "saved_model/saved_model.pb"):
        assert (output / name).exists(), name

    # Loss follows the single-process run.
    multi, ref = _metrics(output), _metrics(reference)
    assert [r["epoch"] for r in multi] == [r["epoch"] for r in ref] == ["1", "2"]
    for m, r in zip(multi, ref, strict=True):
        for key in ("train_loss", "val_loss"):
            assert abs(float(m[key]) - float(r[key])) <= LOSS_TOLERANCE * float(r[key]), (key, m, r)
    assert float(multi[1]["train_loss"]) < float(multi[0]["train_loss"])

    # Only the chief wrote: TensorBoard names its event files after the writing process's pid.
    chief_pids = {str(first[0][0]), str(second[0][0])}
    events = list((output / "logs").rglob("events.out.tfevents.*"))
    writers = {re.search(r"\.(\d+)\.\d+\.v2$", e.name).group(1) for e in events}
    assert events and writers == chief_pids, [e.name for e in events]
    # ...and the worker's temporary folder (the stale one of the killed run too) is gone.
    assert not list((tmp_path / "tmp-worker-1").glob("captioner-*"))


def test_scst_is_refused_with_multi_worker_before_anything_is_written(tmp_path):
    cfg = load_config("smoke", ["train.distribute=multi_worker"])
    assert cfg.scst.enabled
    with pytest.raises(ConfigError, match="scst.enabled") as caught:
        run_training(cfg, tmp_path / "run", progress=False)
    assert caught.value.field == "scst.enabled"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("tf_config", "message"), [
    ("{not json", "TF_CONFIG must be JSON"),
    ('{"cluster": {"worker": ["a:1"]}}', "missing 'task'"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "task index 2"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "ps", "index": 0}}', "chief and worker"),
])
def test_bad_tf_config_names_the_variable(monkeypatch, tf_config, message):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ConfigError, match=message) as caught:
        worker_role("multi_worker")
    assert caught.value.field == "TF_CONFIG"


def test_the_chief_is_the_chief_task_else_worker_0(monkeypatch):
    cluster = {"worker": ["a:1", "b:2"]}
    for index, chief in ((0, True), (1, False)):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        assert worker_role("multi_worker").chief is chief
        assert worker_role("default").chief  # without multi_worker every process runs alone
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["c:0"], **cluster},
                                                "task": {"type": "worker", "index": 0}}))
    role = worker_role("multi_worker")
    assert (role.chief, role.task, role.num_workers) == (False, "worker:0", 3)
