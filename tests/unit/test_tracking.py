import csv
import json
import random

import numpy as np
import pytest

from captioner import ExperimentTracker, set_global_seed

pytestmark = pytest.mark.unit


def test_seed_readme_api(tmp_path):
    set_global_seed(42)
    first = (random.random(), np.random.rand())
    set_global_seed(42)
    assert (random.random(), np.random.rand()) == first

    run = tmp_path / "experiments" / "run_001"
    tracker = ExperimentTracker(run, seed=42)
    tracker.log_config({"model": {"d_model": 256}})
    tracker.log_metrics(epoch=1, train_loss=2.5, val_loss=2.8)
    tracker.log_metrics(epoch=2, train_loss=2.1, val_loss=2.6)
    tracker.log_bleu_scores(bleu1=0.65, bleu2=0.45, bleu3=0.35, bleu4=0.25)
    with tracker.time("train"):
        pass
    tracker.finalize()

    assert json.loads((run / "config_snapshot.json").read_text()) == {"model": {"d_model": 256}}
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [(r["epoch"], r["train_loss"], r["val_loss"]) for r in rows] == [("1", "2.5", "2.8"), ("2", "2.1", "2.6")]
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["status"] == "complete" and summary["seed"] == 42 and summary["epochs"] == 2
    assert summary["final_metrics"]["bleu4"] == 0.25 and "train" in summary["timings_seconds"]
    assert summary["config"] == {"model": {"d_model": 256}} and "git_commit" in summary
    assert (run / "logs").is_dir()


def test_rerun_epoch_replaces_its_row_and_failure_is_not_complete(tmp_path):
    tracker = ExperimentTracker(tmp_path, seed=1)
    tracker.log_metrics(epoch=1, train_loss=3.0)
    tracker.log_metrics(epoch=2, train_loss=2.0)
    tracker.log_metrics(epoch=2, train_loss=1.5, dev_bleu4=0.1)
    assert [(r["epoch"], r["train_loss"]) for r in tracker.history()] == [(1, 3.0), (2, 1.5)]
    tracker.fail(RuntimeError("boom"))
    assert not (tmp_path / "run_summary.json").exists()
    assert "boom" in json.loads((tmp_path / "FAILED.json").read_text())["error"]


def test_synthetic_data_is_deterministic(tmp_path):
    from captioner.config import SyntheticConfig
    from captioner.data.synthetic import generate

    cfg = SyntheticConfig(num_train=6, num_dev=2, num_test=2, image_size=32, seed=5)
    a, b = generate(tmp_path / "a", cfg), generate(tmp_path / "b", cfg)
    assert (a / "captions.tsv").read_text() == (b / "captions.tsv").read_text()
    assert (a / "images" / "train_00003.png").read_bytes() == (b / "images" / "train_00003.png").read_bytes()
    lines = (a / "captions.tsv").read_text().splitlines()
    assert len(lines) == 50 and all(len(line.split("\t")) == 2 for line in lines)
