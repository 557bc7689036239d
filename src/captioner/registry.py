"""The model repository in TensorFlow Serving's layout, the quality gate, and version labels.

    <repo>/<model_name>/<version>/          SavedModel + metadata.json (integer versions)
    <repo>/<model_name>/labels.json         {"stable": 3, "history": [...]}
    <repo>/models.config                    TF Serving model config with version_labels

``<repo>`` is a local folder or a ``gs://`` URI. A version is visible only once complete: locally
it appears in one rename; on GCS ``saved_model.pb`` is uploaded last and a version counts only when
it is there. ``ModelVersionManager`` keeps the seed system's API (register, list, get, compare,
promote/roll back).

    <repo>/repository.json                  settings kept across writers (``serving_base_path``)
    <repo>/<model_name>/.scores/<key>.json  a champion's scores on a candidate's test split (cache)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.constants import METADATA_JSON
from captioner.errors import CaptionerError
from captioner.storage import PublishConflict, join, storage_for

STABLE = "stable"
LABELS_FILE = "labels.json"
MODELS_CONFIG = "models.config"
SETTINGS_FILE = "repository.json"
SCORES_DIR = ".scores"
PUBLISH_ATTEMPTS = 5


class RegistryError(CaptionerError):
    pass


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict. ``champion_bleu4`` is the champion's BLEU-4 on the candidate's test split
    (re-scored, like with like); ``champion_stored_bleu4`` is what its own evaluation recorded, on
    whatever data it was tested on, kept for the record only."""

    passed: bool
    reason: str
    candidate_bleu4: float
    champion_version: int | None
    champion_bleu4: float | None
    champion_stored_bleu4: float | None = None
    split: dict[str, Any] | None = None  # {"dataset", "split", "fingerprint", "images"}
    champion_scored: str | None = None  # "rescored" | "cached" | "same model" | "unscorable"
    decode: dict[str, Any] | None = None
    champion_max_length: int | None = None  # set when the champion's export capped max_length
    champion_error: str | None = None  # why the champion could not be re-scored

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def describe_split(split: dict[str, Any] | None) -> str:
    if not split:
        return "the test split"
    return (f"{split.get('dataset', '?')} {split.get('split', 'test')} split "
            f"(fingerprint {str(split.get('fingerprint', ''))[:8]}, {split.get('images', '?')} images)")


def unscorable_advice(champion_version: int | None) -> str:
    """How to get past a champion the gate cannot re-score (said in the rejection itself)."""
    return (f"to proceed, either re-export champion v{champion_version}'s run folder with this release "
            f"(`captioner export --model RUN_DIR --output OUTPUT`) and register that as a new version, or run "
            f"again with `--allow-unscorable-champion` (pipeline parameter allow_unscorable_champion=True) to "
            f"judge the candidate on the floor alone")


def gate(candidate_bleu4: float, champion_bleu4: float | None, *, floor: float, tolerance: float,
         champion_version: int | None = None, split: dict[str, Any] | None = None,
         champion_stored_bleu4: float | None = None, champion_scored: str | None = None,
         decode: dict[str, Any] | None = None, champion_max_length: int | None = None,
         champion_error: str | None = None, allow_unscorable_champion: bool = False) -> GateDecision:
    """Pass iff BLEU-4 >= floor AND (no champion OR BLEU-4 >= champion - tolerance).

    ``champion_bleu4`` must be the champion's score on the same split with the same decoding and
    scorer as ``candidate_bleu4`` (``workflow.evaluate_and_gate`` re-scores it; ``champion_max_length``
    says it decoded shorter captions than the candidate because its export holds no more); a score
    the champion got on other data says nothing about this candidate. A champion without such a
    score rejects, unless ``allow_unscorable_champion``: then the floor alone decides, and the
    champion's stored number is still not used."""
    where = describe_split(split)

    def decision(passed: bool, reason: str) -> GateDecision:
        return GateDecision(passed, reason, candidate_bleu4, champion_version, champion_bleu4,
                            champion_stored_bleu4, split, champion_scored, decode, champion_max_length,
                            champion_error)

    unscorable = champion_version is not None and champion_bleu4 is None
    why = f" ({champion_error})" if champion_error else ""
    if champion_version is None and champion_bleu4 is None:
        versus = "no champion (first model)"
    elif unscorable:
        versus = f"champion v{champion_version} could not be re-scored on it{why}"
        if allow_unscorable_champion:
            versus += " and --allow-unscorable-champion is set, so the floor alone decides"
    else:
        versus = f"champion v{champion_version} has {champion_bleu4:.4f} on it"
        if champion_max_length is not None:
            asked = (decode or {}).get("max_length", "?")
            versus += (f" (decoded with max_length {champion_max_length}, its export's max_decode_length; "
                       f"the candidate's is {asked})")
    if candidate_bleu4 < floor:
        return decision(False, f"BLEU-4 {candidate_bleu4:.4f} on {where} is below the floor {floor:.4f}; {versus}")
    if unscorable and not allow_unscorable_champion:
        return decision(False, f"champion v{champion_version} could not be re-scored on {where}{why}: cannot "
                               f"compare; {unscorable_advice(champion_version)}")
    if champion_bleu4 is not None and candidate_bleu4 < champion_bleu4 - tolerance:
        capped = f", max_length {champion_max_length}" if champion_max_length is not None else ""
        return decision(False, f"BLEU-4 {candidate_bleu4:.4f} on {where} is worse than champion "
                               f"v{champion_version} ({champion_bleu4:.4f} on the same split{capped}) by more "
                               f"than {tolerance:.4f}")
    return decision(True, f"BLEU-4 {candidate_bleu4:.4f} on {where} >= floor {floor:.4f}; {versus}")


def content_digest(folder: Path) -> str:
    """SHA-256 over the relative paths and bytes of every file: equal digests, equal models."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class ModelRepository:
    """``serving_base_path``: the folder TF Serving sees the repository as (``/models`` when a
    container mounts it there); ``models.config`` names ``<serving_base_path>/<model_name>``. Given
    once, it is stored in ``repository.json`` so that later writers (a label change, the next
    registration) keep it; ``""`` goes back to the repository's own location."""

    def __init__(self, root: str | Path, serving_base_path: str | None = None):
        self.root = str(root).rstrip("/")
        self.storage = storage_for(self.root)
        if serving_base_path is not None and serving_base_path.rstrip("/") != self.serving_base_path:
            settings = {**self.settings(), "serving_base_path": serving_base_path.rstrip("/")}
            self.storage.write_text(join(self.root, SETTINGS_FILE), json.dumps(settings, indent=2, sort_keys=True))
            self.write_models_config()

    def settings(self) -> dict[str, Any]:
        path = join(self.root, SETTINGS_FILE)
        if not self.storage.exists(path):
            return {}
        try:
            return json.loads(self.storage.read_text(path))
        except json.JSONDecodeError as exc:
            raise RegistryError(f"not valid JSON ({exc.msg}, line {exc.lineno})", path=path) from None

    @property
    def serving_base_path(self) -> str:
        return str(self.settings().get("serving_base_path") or "")

    def model_path(self, name: str, version: int | None = None) -> str:
        return join(self.root, name) if version is None else join(self.root, name, str(version))

    def versions(self, name: str) -> list[int]:
        """Complete versions (their saved_model.pb is there), ascending."""
        found = []
        for entry in self.storage.list_dirs(self.model_path(name)):
            if entry.isdigit() and self.storage.exists(join(self.model_path(name, int(entry)), "saved_model.pb")):
                found.append(int(entry))
        return sorted(found)

    def models(self) -> list[str]:
        return [d for d in self.storage.list_dirs(self.root) if not d.startswith(".") and self.versions(d)]

    def metadata(self, name: str, version: int) -> dict[str, Any]:
        path = join(self.model_path(name, version), METADATA_JSON)
        if not self.storage.exists(path):
            raise RegistryError(f"no version {version} of model {name!r}", path=self.model_path(name))
        return json.loads(self.storage.read_text(path))

    def labels(self, name: str) -> dict[str, Any]:
        path = join(self.model_path(name), LABELS_FILE)
        return json.loads(self.storage.read_text(path)) if self.storage.exists(path) else {}

    def champion(self, name: str) -> tuple[int | None, dict[str, Any] | None]:
        """The version labelled ``stable``, else the newest; ``(None, None)`` for an empty repository."""
        versions = self.versions(name)
        if not versions:
            return None, None
        version = self.labels(name).get(STABLE)
        version = version if version in versions else versions[-1]
        return version, self.metadata(name, version)

    def find_by_content(self, name: str, digest: str) -> int | None:
        """The version whose SavedModel has this content digest (as published, or as it was before
        registration re-exported it with its metrics), if one was registered already."""
        for version in self.versions(name):
            metadata = self.metadata(name, version)
            if digest in (metadata.get("content_sha256"), metadata.get("source_sha256")):
                return version
        return None

    @contextlib.contextmanager
    def local_copy(self, name: str, version: int) -> Iterator[Path]:
        """The version's folder on this machine (a temporary download for ``gs://``, removed after)."""
        path = self.model_path(name, version)
        if not path.startswith("gs://"):
            yield Path(path)
            return
        with tempfile.TemporaryDirectory(prefix=f"captioner-{name}-{version}-") as scratch:
            yield self.storage.download_dir(path, Path(scratch) / "version")

    # -- the champion's scores on candidates' test splits, cached --------------------------------
    def _scores_path(self, name: str, key: dict[str, Any]) -> str:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return join(self.model_path(name), SCORES_DIR, f"{digest}.json")

    def cached_scores(self, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        path = self._scores_path(name, key)
        if not self.storage.exists(path):
            return None
        try:
            record = json.loads(self.storage.read_text(path))
        except json.JSONDecodeError:
            return None  # a damaged cache entry is re-scored and rewritten
        return record.get("scores") if record.get("key") == key else None

    def save_scores(self, name: str, key: dict[str, Any], scores: dict[str, Any]) -> None:
        record = {"key": key, "scores": scores, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.storage.write_text(self._scores_path(name, key), json.dumps(record, indent=2, sort_keys=True))

    def publish(self, name: str, saved_model_dir: Path | str, metadata: dict[str, Any],
                version: int | None = None) -> int:
        """Copy a SavedModel in as the next integer version (atomically) and refresh models.config.

        Two registrations racing for the same next number both succeed: the one that loses the
        publication (``PublishConflict``) takes the number after. An explicit ``version`` that
        exists is an error: versions are never overwritten."""
        saved_model_dir = Path(saved_model_dir)
        if not (saved_model_dir / "saved_model.pb").is_file():
            raise RegistryError("not a SavedModel folder (no saved_model.pb)", path=str(saved_model_dir))
        metadata = {**metadata, "content_sha256": content_digest(saved_model_dir)}
        chosen = version
        for _ in range(PUBLISH_ATTEMPTS):
            taken = {int(d) for d in self.storage.list_dirs(self.model_path(name)) if d.isdigit()}
            version = chosen or max(taken, default=0) + 1
            if version in taken:
                raise RegistryError(f"version {version} of {name!r} exists; versions are never overwritten",
                                    path=self.model_path(name, version))
            with tempfile.TemporaryDirectory(prefix="captioner-publish-") as scratch:
                staged = Path(scratch) / "version"
                shutil.copytree(saved_model_dir, staged)
                record = {**metadata, "model_name": name, "version": version,
                          "registered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                (staged / METADATA_JSON).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
                try:
                    self.storage.publish_dir(staged, self.model_path(name, version))
                except PublishConflict:
                    if chosen is not None:
                        raise RegistryError(f"version {version} of {name!r} exists; versions are never "
                                            "overwritten", path=self.model_path(name, version)) from None
                    continue
            self.write_models_config()
            return version
        raise RegistryError(f"could not claim a version number in {PUBLISH_ATTEMPTS} attempts (other "
                            "registrations kept taking them)", path=self.model_path(name))

    def set_label(self, name: str, label: str, version: int) -> None:
        if version not in self.versions(name):
            raise RegistryError(f"cannot label {label!r}: no complete version {version} of {name!r}",
                                path=self.model_path(name))
        labels = self.labels(name)
        history = labels.setdefault("history", [])
        history.append({"label": label, "version": version, "previous": labels.get(label),
                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        labels[label] = version
        self.storage.write_text(join(self.model_path(name), LABELS_FILE), json.dumps(labels, indent=2))
        self.write_models_config()

    def models_config(self) -> str:
        """TF Serving ``--model_config_file`` text: each model's stable and newest versions, labelled."""
        base = self.serving_base_path or self.root
        blocks = []
        for name in self.models():
            versions = self.versions(name)
            labels = {k: v for k, v in self.labels(name).items() if isinstance(v, int) and v in versions}
            serve = sorted({versions[-1], *labels.values()})
            lines = [f'    name: "{name}"', f'    base_path: "{join(base, name)}"',
                     '    model_platform: "tensorflow"',
                     "    model_version_policy { specific { "
                     + " ".join(f"versions: {v}" for v in serve) + " } }"]
            lines += [f'    version_labels {{ key: "{k}" value: {v} }}' for k, v in sorted(labels.items())]
            blocks.append("  config {\n" + "\n".join(lines) + "\n  }")
        return "model_config_list {\n" + "\n".join(blocks) + "\n}\n"

    def write_models_config(self) -> str:
        path = join(self.root, MODELS_CONFIG)
        self.storage.write_text(path, self.models_config())
        return path


class ModelVersionManager:
    """The seed system's version manager over a ``ModelRepository``.

        manager = ModelVersionManager("models/")
        v = manager.register_version(model_path="runs/f8k/saved_model", metrics={"bleu4": 0.25})
        manager.compare_versions(1, 2)
        manager.promote(2)          # label "stable"
        manager.rollback()          # "stable" back to the version it had before
    """

    def __init__(self, root: str | Path, model_name: str = "captioner", serving_base_path: str | None = None):
        self.repository = ModelRepository(root, serving_base_path)
        self.model_name = model_name

    def register_version(self, model_path: str | Path, metrics: dict[str, Any] | None = None,
                         version: int | None = None, **metadata: Any) -> int:
        return self.repository.publish(self.model_name, model_path, {"metrics": metrics or {}, **metadata}, version)

    def list_versions(self) -> list[dict[str, Any]]:
        stable = self.repository.labels(self.model_name).get(STABLE)
        return [{**self.get_version(v), "stable": v == stable} for v in self.repository.versions(self.model_name)]

    def get_version(self, version: int) -> dict[str, Any]:
        return self.repository.metadata(self.model_name, int(version))

    def compare_versions(self, a: int, b: int) -> dict[str, Any]:
        ma, mb = self.get_version(a).get("metrics", {}), self.get_version(b).get("metrics", {})
        keys = sorted(k for k in set(ma) | set(mb) if isinstance(ma.get(k, mb.get(k)), int | float))
        return {"a": int(a), "b": int(b),
                "metrics": {k: {"a": ma.get(k), "b": mb.get(k),
                                "delta": (mb[k] - ma[k]) if isinstance(ma.get(k), int | float)
                                and isinstance(mb.get(k), int | float) else None} for k in keys}}

    def promote(self, version: int, label: str = STABLE) -> None:
        self.repository.set_label(self.model_name, label, int(version))

    def rollback(self, label: str = STABLE) -> int:
        labels = self.repository.labels(self.model_name)
        moves = [h for h in labels.get("history", []) if h["label"] == label]
        if not moves or moves[-1]["previous"] is None:
            raise RegistryError(f"label {label!r} has no earlier version to roll back to",
                                path=self.repository.model_path(self.model_name))
        previous = moves[-1]["previous"]
        self.repository.set_label(self.model_name, label, previous)
        return previous


# -- naming a model on the command line ----------------------------------------------------------
SAVED_MODEL = "saved_model"
TRAINED = "trained"
MODEL_JSON = "model.json"  # a trained-model folder (captioner.train.MODEL_JSON; not imported: that pulls in Keras)


@dataclass(frozen=True)
class ResolvedModel:
    """What ``resolve_model`` found: ``path`` is the folder to load (a SavedModel for
    ``kind="saved_model"``, a trained-model folder with ``model.json`` for ``kind="trained"``);
    ``description`` says which model and version that is, for the user."""

    path: Path
    description: str
    kind: str
    version: int | None = None
    model_name: str | None = None


def _is_saved_model(folder: Path) -> bool:
    return (folder / "saved_model.pb").is_file()


def _pick_version(repo: Path, name: str) -> ResolvedModel:
    """A model folder's ``stable`` version, else its newest (as the gate's champion is chosen)."""
    repository = ModelRepository(repo)
    versions = repository.versions(name)
    stable = repository.labels(name).get(STABLE)
    if stable in versions:
        why = f"labelled {STABLE}"
    elif stable is not None:
        why = f"the newest; the {STABLE} label names version {stable}, which is not there"
    else:
        why = f"the newest of {len(versions)}; none is labelled {STABLE}"
    version = stable if stable in versions else versions[-1]
    return ResolvedModel(repo / name / str(version), f"{repo / name} version {version} ({why})", SAVED_MODEL,
                         version, name)


def _resolve_saved_model(folder: Path, model_name: str | None) -> ResolvedModel | None:
    if _is_saved_model(folder):
        if folder.name.isdigit() and folder.parent.name:
            return ResolvedModel(folder, f"{folder.parent} version {folder.name}", SAVED_MODEL, int(folder.name),
                                 folder.parent.name)
        return ResolvedModel(folder, f"SavedModel {folder}", SAVED_MODEL)
    if _is_saved_model(folder / SAVED_MODEL):
        return ResolvedModel(folder / SAVED_MODEL, f"run {folder} (its {SAVED_MODEL}/)", SAVED_MODEL)
    if ModelRepository(folder.parent).versions(folder.name):
        return _pick_version(folder.parent, folder.name)
    repository = ModelRepository(folder)
    models = repository.models()
    if model_name is not None:
        if model_name not in models:
            raise RegistryError(f"no model {model_name!r} with a complete version in this repository "
                                f"(models: {', '.join(models) or 'none'})", path=str(folder))
        return _pick_version(folder, model_name)
    if len(models) == 1:
        return _pick_version(folder, models[0])
    if len(models) > 1:
        raise RegistryError(f"this repository holds several models ({', '.join(sorted(models))}); name one: "
                            f"{folder / sorted(models)[0]}", path=str(folder))
    return None


def _source_model(resolved: ResolvedModel) -> Path | None:
    """The trained-model folder a SavedModel was exported from, when it is on this machine: the
    run folder around ``RUN/saved_model``, or a registered version's ``source_model``."""
    if resolved.path.name == SAVED_MODEL and (resolved.path.parent / MODEL_JSON).is_file():
        return resolved.path.parent
    try:
        source = json.loads((resolved.path / METADATA_JSON).read_text()).get("source_model")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(source, str) and not source.startswith("gs://") and (Path(source) / MODEL_JSON).is_file():
        return Path(source)
    return None


def resolve_model(path: str | Path, kind: str = SAVED_MODEL, model_name: str | None = None) -> ResolvedModel:
    """The model a user means by ``path``, for every command that takes one.

    ``path`` may be a model repository (its only model, or ``model_name``), a model folder
    (``REPO/<name>``: its version labelled ``stable``, else the newest), a version folder or any
    SavedModel folder, or a run folder (its ``saved_model/``, or for ``kind="trained"`` the run
    itself). ``kind="saved_model"`` finds a SavedModel to caption with; ``kind="trained"`` finds a
    trained-model folder (``model.json`` and weights: what ``evaluate`` and ``export`` load), for a
    SavedModel the folder it was trained in when that is still here. Raises ``RegistryError`` naming
    the path and what was looked for when nothing fits."""
    if kind not in (SAVED_MODEL, TRAINED):
        raise ValueError(f"kind must be {SAVED_MODEL!r} or {TRAINED!r}, not {kind!r}")
    folder = Path(path)
    if str(path).startswith("gs://"):
        raise RegistryError("name a local folder (copy the version from Cloud Storage first)", path=str(path))
    if not folder.exists():
        raise RegistryError("no such folder", path=str(folder))
    if folder.name in ("", ".", ".."):
        folder = folder.resolve()  # "." names a folder too: its name says whether it is a version
    if not folder.is_dir():
        raise RegistryError("is a file; name a model folder (a SavedModel, run, model or repository folder)",
                            path=str(folder))
    if kind == TRAINED and (folder / MODEL_JSON).is_file():
        return ResolvedModel(folder, f"trained model {folder}", TRAINED)
    resolved = _resolve_saved_model(folder, model_name)
    if resolved is None:
        if kind == SAVED_MODEL and (folder / MODEL_JSON).is_file():
            raise RegistryError(f"a trained model ({MODEL_JSON}) without a SavedModel: export one first with "
                                f"`captioner export --model {folder} --output {folder / SAVED_MODEL}`",
                                path=str(folder))
        if (folder / SETTINGS_FILE).is_file() or (folder / MODELS_CONFIG).is_file():
            raise RegistryError("a model repository without any complete version yet (register one with "
                                "`captioner pipeline run --local --model-repo ...`)", path=str(folder))
        wanted = "a trained-model folder (model.json), " if kind == TRAINED else ""
        raise RegistryError(f"no model found here: looked for {wanted}a SavedModel (saved_model.pb), a run folder "
                            f"(saved_model/saved_model.pb), a model folder (numbered versions with saved_model.pb) "
                            f"and a model repository (<model>/<version>/saved_model.pb)", path=str(folder))
    if kind == SAVED_MODEL:
        return resolved
    source = _source_model(resolved)
    if source is None:
        raise RegistryError(f"{resolved.description} is a SavedModel; this command needs the trained-model folder "
                            f"({MODEL_JSON} and weights) it was exported from, which is not recorded or not on "
                            f"this machine: name the run folder", path=str(folder))
    return ResolvedModel(source, f"{resolved.description}, trained in {source}", TRAINED, resolved.version,
                         resolved.model_name)
