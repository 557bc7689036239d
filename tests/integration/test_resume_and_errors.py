"""Resume after a kill, and clear errors for bad input (the CLI's exit code and one-line reason)."""

import csv
import json
import os
import re
import shutil
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
    # Cross-entropy epoch lines start the line ("SCST epoch 1:" of the smoke SCST phase does not count).
    assert not re.search(r"^epoch 1:", resumed.stdout, re.M) and re.search(r"^epoch 2:", resumed.stdout, re.M)
    after = _rows(out)
    assert [(r["epoch"], r["phase"]) for r in after] == [("1", "xe"), ("2", "xe"), ("3", "xe"), ("4", "scst"),
                                                         ("5", "scst")]
    # SCST rows add columns (empty for epoch 1); epoch 1's own values are unchanged.
    assert {k: after[0][k] for k in before[0]} == before[0], "epoch 1 was not trained again"
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
    with pytest.raises(SystemExit) as exited:  # exit code 1: some images could not be captioned
        main(["caption", "--model", str(out / "saved_model"), str(bad)])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and f"{bad}: not a decodable image" in err



def test_finished_training_is_not_repeated_on_rerun(smoke_run, tmp_path):
    """A run that trained to the end but failed afterwards (say, at export) resumes without training.
    A copy of the shared smoke run, trained to the end, stands for it (no training of its own here);
    its final weights are removed, so the rerun has to write them again from the checkpoints."""
    from captioner.train import train_model
    from captioner.workflow import extract_step, load_data, tokenize_step

    out, cfg = smoke_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "model.weights.h5").unlink()
    data = load_data(cfg)
    tokenizer = tokenize_step(cfg, data, run)
    store = extract_step(cfg, data, progress=False)
    before = (run / "metrics.csv").read_text()
    train_model(cfg, data, tokenizer, store, run, progress=False)
    assert (run / "metrics.csv").read_text() == before
    assert (run / "model.weights.h5").is_file()


# -- an honest resume (issue #7) --------------------------------------------------------------------
@pytest.fixture()
def interrupted_run(smoke_run, tmp_path):
    """A copy of the smoke run as if it had been killed after training (no run_summary.json yet)."""
    out, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "run_summary.json").unlink()
    return copy


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("change, shown", [("train.learning_rate=0.01", "train.learning_rate 0.003 -> 0.01"),
                                           ("model.d_model=32", "model.d_model 64 -> 32")])
def test_resume_with_a_changed_config_is_refused(interrupted_run, capsys, change, shown):
    """Continuing a run with other hyper-parameters would mix two configurations (and a changed
    model shape used to end in a raw Keras error): refused, naming the field, the run untouched."""
    before = _tree(interrupted_run)
    code, err = _cli_error(capsys, ["train", "--config", "smoke", "--output", str(interrupted_run), "--quiet",
                                    "--set", change])
    assert code == 2 and shown in err and "--restart" in err
    assert "Traceback" not in err and "keras" not in err.lower()
    assert _tree(interrupted_run) == before


def test_resume_on_other_data_is_refused(interrupted_run, smoke_run, tmp_path, capsys):
    from captioner.workflow import load_data

    _, cfg = smoke_run
    other = tmp_path / "other-data"
    shutil.copytree(load_data(cfg).images_dir.parent, other)
    captions = other / "captions.tsv"
    captions.write_text(captions.read_text().replace("red", "crimson"))
    before = _tree(interrupted_run)
    code, err = _cli_error(capsys, ["train", "--config", "smoke", "--output", str(interrupted_run), "--quiet",
                                    "--set", f"data.root={other}"])
    assert code == 2 and "data.root" in err and "fingerprint" in err
    assert _tree(interrupted_run) == before


def test_resume_with_an_allowed_change_is_recorded(interrupted_run, capsys):
    """A change that does not alter what was trained (here the test beam size) is accepted, and the
    run says so: the snapshot holds the new value and run_summary.json the change, old -> new."""
    code = main(["train", "--config", "smoke", "--output", str(interrupted_run), "--quiet",
                 "--set", "decode.beam_size=3"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((interrupted_run / "run_summary.json").read_text())
    assert [r["changed"] for r in summary["resumed_with_changes"]] == [{"decode.beam_size": [2, 3]}]
    assert summary["config"]["decode"]["beam_size"] == 3
    assert json.loads((interrupted_run / "evaluation.json").read_text())["beam"]["beam_size"] == 3


def test_extending_epochs_of_a_finished_training_is_refused(interrupted_run, capsys):
    """More epochs would not train a run whose training finished: saying so beats recording 6 epochs."""
    code, err = _cli_error(capsys, ["train", "--config", "smoke", "--output", str(interrupted_run), "--quiet",
                                    "--set", "train.epochs=6"])
    assert code == 2 and "train.epochs 4 -> 6" in err and "finished" in err


def test_resume_policy():
    """Which changes a resume accepts: how long and how it trains, where the data is, and everything
    after training; not what is trained (model, tokenizer, features, data, optimisation)."""
    from captioner.config import load_config
    from captioner.workflow import _resumable, config_changes

    old = load_config("smoke").to_dict()
    new = load_config("smoke", ["train.epochs=9", "decode.beam_size=4", "export.warmup=false",
                                "train.seed=1", "tokenizer.min_count=2", "features.flip_train=true"])
    changes = config_changes(old, new)
    assert changes["train.epochs"] == (4, 9) and set(changes) == {
        "train.epochs", "decode.beam_size", "export.warmup", "train.seed", "tokenizer.min_count",
        "features.flip_train"}
    assert {name for name in changes if _resumable(name)} == {"train.epochs", "decode.beam_size", "export.warmup"}
    assert not config_changes(old, load_config("smoke"))


def test_restart_starts_over_and_keeps_the_users_files(smoke_run, tmp_path, capsys):
    out, _ = smoke_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    mine = {run / "notes.txt": os.urandom(32), run / "logs" / "my-notes.txt": os.urandom(32),
            run / "checkpoints" / "mine.bin": os.urandom(32),
            run / "checkpoints" / "scst" / "ckpt-mine.txt": os.urandom(32)}  # named like a checkpoint file
    for path, data in mine.items():
        path.write_bytes(data)
    old_summary = (run / "run_summary.json").read_bytes()
    code = main(["train", "--config", "smoke", "--output", str(run), "--quiet", "--restart",
                 "--set", "train.epochs=1", "--set", "decode.beam_size=3"])
    assert code == 0, capsys.readouterr().err
    assert all(path.read_bytes() == data for path, data in mine.items())
    # One cross-entropy epoch, then both SCST epochs again: the old SCST checkpoint was removed too.
    assert [(r["epoch"], r["phase"]) for r in _rows(run)] == [("1", "xe"), ("2", "scst"), ("3", "scst")]
    summary = json.loads((run / "run_summary.json").read_text())
    assert (run / "run_summary.json").read_bytes() != old_summary and summary["config"]["train"]["epochs"] == 1
    assert json.loads((run / "config_snapshot.json").read_text())["decode"]["beam_size"] == 3
    assert "resumed_with_changes" not in summary
    assert (run / "saved_model" / "saved_model.pb").is_file()


def test_no_resume_is_an_alias_of_restart():
    from captioner.cli import train

    option = next(p for p in train.params if "--restart" in p.opts)
    assert "--no-resume" in option.opts and option.is_flag


def test_killed_scst_phase_resumes_where_it_stopped(tmp_path):
    """SCST checkpoints model, optimizer and epoch: a run killed after SCST epoch 2 redoes neither
    cross-entropy nor SCST epochs 1-2, and its epoch 3 is the uninterrupted run's epoch 3."""
    # No SavedModel export: the figures compared are SCST's, and export comes after them.
    scst = ("--set", "scst.enabled=true", "--set", "scst.epochs=3", "--set", "scst.patience=9",
            "--set", "export.enabled=false")
    out = tmp_path / "run"
    killed = _train(out, *scst, env={"CAPTIONER_KILL_AFTER_SCST_EPOCH": "2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = _rows(out)
    assert [(r["epoch"], r["phase"]) for r in before] == [("1", "xe"), ("2", "xe"), ("3", "xe"), ("4", "scst"),
                                                          ("5", "scst")]
    resumed = _train(out, *scst)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "SCST: resuming after epoch 2" in resumed.stdout
    assert "SCST epoch 1:" not in resumed.stdout and "SCST epoch 3:" in resumed.stdout
    assert "epoch 1:" not in resumed.stdout.replace("SCST epoch 1:", "")
    after = _rows(out)
    assert after[:5] == before
    assert [(r["epoch"], r["phase"]) for r in after][5:] == [("6", "scst")]

    straight = tmp_path / "straight"
    assert _train(straight, *scst).returncode == 0
    reference = _rows(straight)
    for key in ("train_reward", "dev_cider"):
        assert float(after[5][key]) == pytest.approx(float(reference[5][key]), rel=1e-3, abs=1e-3), key
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["scst"]["epochs"] == 3 and summary["scst"]["xe_dev_cider"] > 0
