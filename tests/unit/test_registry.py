import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from captioner.registry import ModelRepository, ModelVersionManager, RegistryError, gate

pytestmark = pytest.mark.unit


def fake_saved_model(folder, tag="x"):
    """A folder shaped like a SavedModel (the repository copies files; it does not load them)."""
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"pb-" + tag.encode())
    (folder / "variables" / "variables.index").write_bytes(b"idx")
    return folder


SPLIT = {"dataset": "flickr8k", "split": "test", "fingerprint": "0123456789abcdef", "images": 1000}


def test_gate_floor_and_champion():
    assert gate(0.20, None, floor=0.1, tolerance=0.01).passed
    assert not gate(0.05, None, floor=0.1, tolerance=0.01).passed
    assert gate(0.195, 0.20, floor=0.1, tolerance=0.01, champion_version=1).passed
    decision = gate(0.18, 0.20, floor=0.1, tolerance=0.01, champion_version=1)
    assert not decision.passed and "champion v1" in decision.reason


def test_gate_reason_names_both_scores_and_the_split():
    """The champion's score is its score on the candidate's split; what it stored is only recorded."""
    worse = gate(0.18, 0.20, floor=0.1, tolerance=0.01, champion_version=3, split=SPLIT,
                 champion_stored_bleu4=0.94, champion_scored="rescored")
    assert not worse.passed
    for part in ("0.1800", "0.2000", "champion v3", "flickr8k test split", "01234567", "1000 images"):
        assert part in worse.reason, part
    assert "0.94" not in worse.reason  # the stored score is of other data: never the yardstick
    assert worse.to_dict()["champion_stored_bleu4"] == 0.94 and worse.to_dict()["split"] == SPLIT
    better = gate(0.25, 0.20, floor=0.1, tolerance=0.01, champion_version=3, split=SPLIT, champion_stored_bleu4=0.94)
    assert better.passed and "0.2500" in better.reason and "0.2000" in better.reason and "01234567" in better.reason
    floor = gate(0.05, 0.01, floor=0.1, tolerance=0.01, champion_version=3, split=SPLIT)
    assert not floor.passed and "below the floor 0.1000" in floor.reason and "1000 images" in floor.reason
    # A champion that could not be scored on this split is no excuse to compare with something else.
    unscored = gate(0.25, None, floor=0.1, tolerance=0.01, champion_version=3, split=SPLIT, champion_stored_bleu4=0.1)
    assert not unscored.passed and "cannot compare" in unscored.reason


def test_unscorable_champion_rejects_by_default_and_says_how_to_proceed():
    error = "ModelError: exported by an older captioner"
    kept = gate(0.25, None, floor=0.1, tolerance=0.01, champion_version=3, split=SPLIT, champion_stored_bleu4=0.1,
                champion_scored="unscorable", champion_error=error)
    assert not kept.passed and kept.champion_error == error
    for part in ("champion v3 could not be re-scored", error, "captioner export", "--allow-unscorable-champion",
                 "allow_unscorable_champion=True", "floor alone"):
        assert part in kept.reason, part


def test_allowing_an_unscorable_champion_lets_the_floor_alone_decide():
    """Never the champion's stored number: 0.94 would reject a 0.25 candidate."""
    allowed = gate(0.25, None, floor=0.1, tolerance=0.01, champion_version=3, split=SPLIT, champion_stored_bleu4=0.94,
                   champion_error="ModelError: old export", allow_unscorable_champion=True)
    assert allowed.passed and allowed.champion_bleu4 is None
    assert "could not be re-scored" in allowed.reason and "the floor alone decides" in allowed.reason
    assert "0.94" not in allowed.reason
    low = gate(0.05, None, floor=0.1, tolerance=0.01, champion_version=3, split=SPLIT,
               champion_error="ModelError: old export", allow_unscorable_champion=True)
    assert not low.passed and "below the floor 0.1000" in low.reason


def test_reason_says_when_the_champion_decoded_shorter_captions():
    decode = {"beam_size": 3, "max_length": 50}
    better = gate(0.25, 0.20, floor=0.1, tolerance=0.01, champion_version=3, split=SPLIT, decode=decode,
                  champion_max_length=40)
    assert better.passed and "max_length 40" in better.reason and "max_decode_length" in better.reason
    assert "50" in better.reason and better.to_dict()["champion_max_length"] == 40
    worse = gate(0.10, 0.20, floor=0.1, tolerance=0.01, champion_version=3, split=SPLIT, decode=decode,
                 champion_max_length=40)
    assert not worse.passed and "max_length 40" in worse.reason


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


# gcp-storage-emulator ignores preconditions (``ifGenerationMatch``): it accepts a second create of
# an object and overwrites it. This bootstrap runs the same emulator with its object-insert handler
# wrapped to answer 412 conditionNotMet as GCS does, so the publication's conflict path meets a
# server that enforces what real GCS enforces.
ENFORCING_EMULATOR = """
import sys
from http import HTTPStatus
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

insert = objects.insert

def enforcing_insert(request, response, storage, *args, **kwargs):
    if request.query.get("ifGenerationMatch") == ["0"]:
        name = (request.query.get("name") or [None])[0]
        if name is None and request.query.get("uploadType") == ["multipart"]:
            name = request.data["meta"].get("name")
        try:
            storage.get_file_obj(request.params["bucket_name"], name)
        except NotFound:
            pass
        else:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified "
                           "did not hold.", "errors": [{"reason": "conditionNotMet", "message": "precondition"}]}})
            return None
    return insert(request, response, storage, *args, **kwargs)

objects.insert = enforcing_insert
server.HANDLERS = tuple((regex, {m: enforcing_insert if h is insert else h for m, h in handlers.items()})
                        for regex, handlers in server.HANDLERS)
server.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True).run()
"""


def start_emulator(monkeypatch, enforcing: bool = False):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = ([sys.executable, "-c", ENFORCING_EMULATOR, str(port)] if enforcing else
               [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
                "--in-memory"])
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    return proc


@pytest.fixture
def gcs_emulator(monkeypatch):
    proc = start_emulator(monkeypatch)
    yield "gs://models/serving"
    proc.kill()
    proc.wait()


@pytest.fixture
def enforcing_gcs_emulator(monkeypatch):
    proc = start_emulator(monkeypatch, enforcing=True)
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


def record_requests(storage) -> list:
    """Every HTTP request this storage's client sends (the real traffic to the emulator)."""
    sent = []
    storage.client._http.hooks["response"].append(lambda response, *a, **k: sent.append(response.request))
    return sent


def test_gcs_publication_creates_each_object_only_if_absent_marker_last(gcs_emulator, tmp_path):
    repository = ModelRepository(gcs_emulator)
    sent = record_requests(repository.storage)
    repository.publish("captioner", fake_saved_model(tmp_path / "a", "a"), {})
    uploads = [r for r in sent if r.method == "POST" and "uploadType" in r.url]
    queries = [parse_qs(urlparse(r.url).query) for r in uploads]
    # Small files go up as multipart uploads: the object name is in the JSON part of the body.
    names = [q["name"][0] if "name" in q else re.search(rb'"name": "([^"]+)"', r.body)[1].decode()
             for q, r in zip(queries, uploads, strict=True)]
    version = "serving/captioner/1/"
    objects = [(n, q) for n, q in zip(names, queries, strict=True) if n.startswith(version)]
    assert sorted(n for n, _ in objects) == [version + f for f in ("metadata.json", "saved_model.pb",
                                                                   "variables/variables.index")]
    assert all(q.get("ifGenerationMatch") == ["0"] for _, q in objects), objects
    assert objects[-1][0] == version + "saved_model.pb"
    # A second publisher into an existing version is refused before it uploads anything.
    from captioner.storage import PublishConflict

    with pytest.raises(PublishConflict, match="never overwritten"):
        repository.storage.publish_dir(fake_saved_model(tmp_path / "b", "b"), gcs_emulator + "/captioner/1")
    assert repository.storage.read_text(gcs_emulator + "/captioner/1/saved_model.pb") == "pb-a"


def test_gcs_publisher_that_loses_a_race_removes_its_objects_and_takes_the_next_version(
        enforcing_gcs_emulator, tmp_path):
    """B checked that version 1 was free; then A created one of its objects. B's create of that
    object fails on its precondition: B deletes what it had uploaded and registers as version 2."""
    from captioner.storage import GCSStorage

    root = enforcing_gcs_emulator
    repository = ModelRepository(root)
    other = GCSStorage()
    b_uploads = []

    def a_sneaks_in(response, *args, **kwargs):
        if response.request.method == "POST" and "uploadType" in response.request.url:
            b_uploads.append(response.status_code)
            if len(b_uploads) == 1:  # B has created captioner/1/metadata.json
                other._blob(root + "/captioner/1/variables/variables.index").upload_from_string(
                    b"idx-of-a", if_generation_match=0)

    repository.storage.client._http.hooks["response"].append(a_sneaks_in)
    version = repository.publish("captioner", fake_saved_model(tmp_path / "b", "b"), {"who": "B"})
    assert version == 2 and b_uploads[:2] == [200, 412]
    bucket, prefix = GCSStorage.split(root + "/captioner/1/")
    left = {b.name[len(prefix):]: b.download_as_bytes() for b in other.client.list_blobs(bucket, prefix=prefix)}
    assert left == {"variables/variables.index": b"idx-of-a"}  # nothing of B interleaved into A's version
    assert repository.versions("captioner") == [2] and repository.metadata("captioner", 2)["who"] == "B"
    assert repository.storage.read_text(root + "/captioner/2/saved_model.pb") == "pb-b"
    # An explicit version number that another writer holds is an error, never an overwrite.
    with pytest.raises(RegistryError, match="never overwritten"):
        repository.publish("captioner", fake_saved_model(tmp_path / "c", "c"), {}, version=1)


def all_modes(root) -> dict[str, int]:
    root = Path(root)
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_versions_and_models_config_are_readable_by_other_users(tmp_path):
    """A serving container runs as another user: dirs 0755 and files 0644 whatever the umask, and
    although the export's temp folders are 0700 (mkdtemp) and its files 0600 (mkstemp)."""
    source = fake_saved_model(tmp_path / "export", "a")
    for path in [source, *source.rglob("*")]:
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
    old = os.umask(0o077)
    try:
        manager = ModelVersionManager(tmp_path / "models")
        manager.register_version(source, metrics={"bleu4": 0.2})
        manager.promote(1)
    finally:
        os.umask(old)
    modes = all_modes(tmp_path / "models")
    assert "models/models.config" in modes and "models/captioner/1/saved_model.pb" in modes
    assert "models/captioner/labels.json" in modes
    wrong = {p: oct(m) for p, m in modes.items()
             if m != (0o755 if (tmp_path / p).is_dir() else 0o644)}
    assert not wrong, wrong


def parse_models_config(text: str):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig()).model_config_list.config[0]


def test_models_config_names_the_serving_mount_and_later_writers_keep_it(tmp_path):
    root = tmp_path / "models"
    ModelRepository(root, serving_base_path="/models/")
    manager = ModelVersionManager(root)  # a later writer (the register step, a promotion) is not told again
    manager.register_version(fake_saved_model(tmp_path / "a", "a"))
    manager.register_version(fake_saved_model(tmp_path / "b", "b"))
    manager.promote(1)
    model = parse_models_config((root / "models.config").read_text())
    assert model.base_path == "/models/captioner" and dict(model.version_labels) == {"stable": 1}
    ModelRepository(root, serving_base_path="")  # back to the repository's own location
    assert parse_models_config((root / "models.config").read_text()).base_path == str(root / "captioner")


def test_docker_compose_serves_what_make_demo_writes():
    """`make demo` registers into ./models with --serving-base-path /models; the compose file mounts
    ./models at /models and points TF Serving at the models.config there."""
    import yaml

    project = Path(__file__).resolve().parents[2]
    deploy = project / "serving" / "deploy"
    demo = (project / "Makefile").read_text().split("\ndemo:")[1].split("\n\n")[0]
    assert "--model-repo models" in demo and "--serving-base-path /models" in demo
    tfserving = yaml.safe_load((deploy / "docker-compose.yaml").read_text())["services"]["tfserving"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in tfserving["volumes"]}
    assert (deploy / mounts["/models"]).resolve() == project / "models"
    assert "--model_config_file=/models/models.config" in tfserving["command"]
