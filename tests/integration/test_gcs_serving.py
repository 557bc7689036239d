"""The gateway's local backend over a gs:// repository (gcp-storage-emulator): a poll lists versions
and downloads nothing unless the version to serve changed; one download per new version, into one
cache folder, and the superseded copy is removed."""

import tempfile

import pytest
from captioner.serving.backends import LocalBackend

from captioner.registry import ModelRepository, ModelVersionManager
from tests.unit.test_registry import gcs_emulator  # noqa: F401 - the emulator fixture

pytestmark = pytest.mark.integration


def copies(tmp):
    """The model copies in the temp folder: {folder: [its entries]} (TF's own temp files aside)."""
    return {p.name: sorted(e.name for e in p.iterdir()) for p in tmp.iterdir()
            if p.is_dir() and p.name.startswith("captioner-")}


def test_gcs_backend_downloads_once_per_version_and_removes_superseded(gcs_emulator, smoke_run, tmp_path,  # noqa: F811
                                                                      monkeypatch):
    out, _ = smoke_run
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    repository = ModelRepository(gcs_emulator)
    repository.publish("captioner", out / "saved_model", {"metrics": {"bleu4": 0.3}})
    backend = LocalBackend(model_repo=gcs_emulator, poll_seconds=0)
    assert backend.load_latest() is True
    first = copies(tmp)
    assert len(first) == 1 and list(first.values()) == [["1"]]
    for _ in range(3):  # unchanged repository: no download, no new folder
        assert backend.load_latest() is False
    assert copies(tmp) == first
    repository.publish("captioner", out / "saved_model", {"metrics": {"bleu4": 0.31}})
    assert backend.load_latest() is True and backend.info()["version"] == "2"
    assert copies(tmp) == {next(iter(first)): ["2"]}  # the copy of version 1 is gone
    ModelVersionManager(gcs_emulator).promote(1)  # a rollback to 1: downloaded again, 2 removed
    assert backend.load_latest() is True and backend.info()["version"] == "1"
    assert copies(tmp) == {next(iter(first)): ["1"]}
