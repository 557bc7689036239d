import json
import socket
import subprocess
import sys
import time

import pytest

from captioner.registry import ModelRepository, ModelVersionManager, RegistryError, gate

pytestmark = pytest.mark.unit


def fake_saved_model(folder, tag="x"):
    """A folder shaped like a SavedModel (the repository copies files; it does not load them)."""
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"pb-" + tag.encode())
    (folder / "variables" / "variables.index").write_bytes(b"idx")
    return folder


def test_gate_floor_and_champion():
    assert gate(0.20, None, floor=0.1, tolerance=0.01).passed
    assert not gate(0.05, None, floor=0.1, tolerance=0.01).passed
    assert gate(0.195, 0.20, floor=0.1, tolerance=0.01, champion_version=1).passed
    decision = gate(0.18, 0.20, floor=0.1, tolerance=0.01, champion_version=1)
    assert not decision.passed and "champion v1" in decision.reason


def run_repository_contract(root, tmp_path):
    manager = ModelVersionManager(root)
    assert manager.repository.versions("captioner") == []
    v1 = manager.register_version(fake_saved_model(tmp_path / "a", "a"), metrics={"bleu4": 0.20}, run_id="r1")
    v2 = manager.register_version(fake_saved_model(tmp_path / "b", "b"), metrics={"bleu4": 0.22})
    assert (v1, v2) == (1, 2)
    assert [v["version"] for v in manager.list_versions()] == [1, 2]
    assert manager.get_version(1)["run_id"] == "r1"
    assert manager.compare_versions(1, 2)["metrics"]["bleu4"]["delta"] == pytest.approx(0.02)
    assert manager.repository.champion("captioner")[0] == 2
    manager.promote(1)
    assert manager.repository.champion("captioner")[0] == 1
    manager.promote(2)
    assert manager.rollback() == 1
    config = manager.repository.storage.read_text(root.rstrip("/") + "/models.config")
    assert 'name: "captioner"' in config and 'version_labels { key: "stable" value: 1 }' in config
    assert "versions: 1 versions: 2" in config
    with pytest.raises(RegistryError, match="never overwritten"):
        manager.register_version(fake_saved_model(tmp_path / "c"), version=2)
    with pytest.raises(RegistryError, match="no complete version 9"):
        manager.promote(9)
    return manager


def test_local_repository(tmp_path):
    root = tmp_path / "repo"
    run_repository_contract(str(root), tmp_path)
    assert (root / "captioner" / "2" / "saved_model.pb").read_bytes() == b"pb-b"
    assert json.loads((root / "captioner" / "1" / "metadata.json").read_text())["metrics"] == {"bleu4": 0.2}


def test_partial_local_version_is_invisible(tmp_path):
    repo = ModelRepository(tmp_path / "repo")
    partial = tmp_path / "repo" / "captioner" / "3"
    partial.mkdir(parents=True)
    (partial / "variables").mkdir()  # a copy killed before saved_model.pb
    assert repo.versions("captioner") == []
    (tmp_path / "repo" / "captioner" / ".4.partial-123").mkdir()
    assert repo.versions("captioner") == []


def test_killed_registration_leaves_no_version(tmp_path):
    """SIGKILL a registration in the middle of its copy: no version may be visible afterwards."""
    src = fake_saved_model(tmp_path / "big")
    for i in range(1500):  # big enough that the copy is still running when the kill lands
        (src / "variables" / f"shard-{i}").write_bytes(b"0" * 100_000)
    code = ("import sys; from captioner.registry import ModelRepository; "
            "ModelRepository(sys.argv[1]).publish('captioner', sys.argv[2], {})")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "repo"), str(src)])
    model_dir = tmp_path / "repo" / "captioner"
    deadline = time.time() + 60
    while time.time() < deadline and not any(model_dir.glob(".*partial*/variables/shard-*")):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert ModelRepository(tmp_path / "repo").versions("captioner") == []
    assert not (model_dir / "1").exists()


@pytest.fixture
def gcs_emulator(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    from captioner.storage import GCSStorage

    GCSStorage().client.create_bucket("models")
    yield "gs://models/serving"
    proc.kill()
    proc.wait()


def test_gcs_repository_against_the_emulator(gcs_emulator, tmp_path):
    manager = run_repository_contract(gcs_emulator, tmp_path)
    storage = manager.repository.storage
    assert storage.read_text(gcs_emulator + "/captioner/2/metadata.json")
    # An upload that stopped before saved_model.pb is not a version.
    storage.write_text(gcs_emulator + "/captioner/3/variables/variables.index", "partial")
    assert manager.repository.versions("captioner") == [1, 2]
    out = storage.download_dir(gcs_emulator + "/captioner/2", tmp_path / "down")
    assert (out / "saved_model.pb").read_bytes() == b"pb-b"
