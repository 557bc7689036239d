"""Resume after a kill, and clear errors for bad input (the CLI's exit code and one-line reason)."""

import csv
import os
import subprocess
import sys

import pytest

from captioner.cli import main

from ..unit.test_readers import make_tsv

pytestmark = pytest.mark.integration


def _train(out, *extra, env=None):
    cmd = [sys.executable, "-m", "captioner.cli", "train", "--config", "smoke", "--output", str(out),
           "--set", "train.epochs=3", "--set", "train.early_stopping_patience=9", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def _rows(out):
    with (out / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    killed = _train(out, env={"CAPTIONER_KILL_AFTER_EPOCH": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "run_summary.json").exists()
    before = _rows(out)
    assert [r["epoch"] for r in before] == ["1"]

    resumed = _train(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "epoch 1:" not in resumed.stdout and "epoch 2:" in resumed.stdout
    after = _rows(out)
    assert [r["epoch"] for r in after] == ["1", "2", "3"]
    assert after[0] == before[0], "epoch 1 was not trained again"
    assert (out / "run_summary.json").is_file() and (out / "saved_model" / "saved_model.pb").is_file()

    again = _train(out)
    assert again.returncode == 2 and "already holds a complete run" in again.stderr


def _cli_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    return code, err


def _run_on(tmp_path, capsys, root):
    out = tmp_path / "out"
    code, err = _cli_error(capsys, ["train", "--config", "smoke", "--output", str(out), "--quiet",
                                    "--set", "data.format=auto", "--set", f"data.root={root}"])
    assert not (out / "run_summary.json").exists()
    assert not (out / "saved_model").exists()
    return code, err


def test_malformed_captions_file(tmp_path, capsys):
    root = make_tsv(tmp_path / "data", lines=["a.jpg\tok", "b.jpg", "c.jpg\tok"])
    code, err = _run_on(tmp_path, capsys, root)
    assert code == 2 and "captions.tsv:2:" in err


def test_missing_image(tmp_path, capsys):
    root = make_tsv(tmp_path / "data", images=("a.jpg", "c.jpg"))
    code, err = _run_on(tmp_path, capsys, root)
    assert code == 2 and "b.jpg" in err and "missing" in err


def test_corrupt_jpeg(tmp_path, capsys):
    root = make_tsv(tmp_path / "data")
    (root / "images" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code, err = _run_on(tmp_path, capsys, root)
    assert code == 2 and "b.jpg" in err and "image" in err


def test_empty_split(tmp_path, capsys):
    root = make_tsv(tmp_path / "data", splits={"train": ["a.jpg"], "dev": ["b.jpg"], "test": []})
    code, err = _run_on(tmp_path, capsys, root)
    assert code == 2 and "test.txt" in err and "empty" in err


def test_unknown_preset(tmp_path, capsys):
    code, err = _cli_error(capsys, ["train", "--config", "nope", "--output", str(tmp_path / "o")])
    assert code == 2 and "unknown preset 'nope'" in err and "flickr8k" in err
    assert not (tmp_path / "o").exists()


def test_bad_override_names_the_field(tmp_path, capsys):
    code, err = _cli_error(capsys, ["train", "--config", "smoke", "--output", str(tmp_path / "o"),
                                    "--set", "decode.beam_size=wide"])
    assert code == 2 and "decode.beam_size" in err


def test_caption_reports_an_undecodable_image(smoke_run, tmp_path, capsys):
    out, _ = smoke_run
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    code, err = _cli_error(capsys, ["caption", "--model", str(out / "saved_model"), str(bad)])
    assert code == 2 and "bad.png" in err



def test_finished_training_is_not_repeated_on_rerun(tmp_path):
    """A run that trained to the end but failed afterwards (say, at export) resumes without training."""
    from captioner.config import load_config
    from captioner.train import train_model
    from captioner.workflow import extract_step, load_data, tokenize_step

    cfg = load_config("smoke", ["train.epochs=2"])
    data = load_data(cfg)
    tokenizer = tokenize_step(cfg, data, tmp_path)
    store = extract_step(cfg, data, progress=False)
    train_model(cfg, data, tokenizer, store, tmp_path, progress=False)
    before = (tmp_path / "metrics.csv").read_text()
    train_model(cfg, data, tokenizer, store, tmp_path, progress=False)
    assert (tmp_path / "metrics.csv").read_text() == before
    assert (tmp_path / "model.weights.h5").is_file()
