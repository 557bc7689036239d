"""The model repository in TensorFlow Serving's layout, the quality gate, and version labels.

    <repo>/<model_name>/<version>/          SavedModel + metadata.json (integer versions)
    <repo>/<model_name>/labels.json         {"stable": 3, "history": [...]}
    <repo>/models.config                    TF Serving model config with version_labels

``<repo>`` is a local folder or a ``gs://`` URI. A version is visible only once complete: locally
it appears in one rename; on GCS ``saved_model.pb`` is uploaded last and a version counts only when
it is there. ``ModelVersionManager`` keeps the seed system's API (register, list, get, compare,
promote/roll back).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.constants import METADATA_JSON
from captioner.errors import CaptionerError
from captioner.storage import join, storage_for

STABLE = "stable"
LABELS_FILE = "labels.json"
MODELS_CONFIG = "models.config"


class RegistryError(CaptionerError):
    pass


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    candidate_bleu4: float
    champion_version: int | None
    champion_bleu4: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def gate(candidate_bleu4: float, champion_bleu4: float | None, *, floor: float, tolerance: float,
         champion_version: int | None = None) -> GateDecision:
    """Pass iff BLEU-4 >= floor AND (no champion OR BLEU-4 >= champion - tolerance)."""
    if candidate_bleu4 < floor:
        return GateDecision(False, f"BLEU-4 {candidate_bleu4:.4f} is below the floor {floor:.4f}", candidate_bleu4,
                            champion_version, champion_bleu4)
    if champion_bleu4 is not None and candidate_bleu4 < champion_bleu4 - tolerance:
        return GateDecision(False, f"BLEU-4 {candidate_bleu4:.4f} is worse than champion v{champion_version} "
                            f"({champion_bleu4:.4f}) by more than {tolerance:.4f}", candidate_bleu4,
                            champion_version, champion_bleu4)
    why = "first model" if champion_bleu4 is None else f"champion v{champion_version} has {champion_bleu4:.4f}"
    return GateDecision(True, f"BLEU-4 {candidate_bleu4:.4f} >= floor {floor:.4f}; {why}", candidate_bleu4,
                        champion_version, champion_bleu4)


def content_digest(folder: Path) -> str:
    """SHA-256 over the relative paths and bytes of every file: equal digests, equal models."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class ModelRepository:
    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/")
        self.storage = storage_for(self.root)

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
        """The version whose SavedModel has this content digest, if one was registered already."""
        for version in self.versions(name):
            if self.metadata(name, version).get("content_sha256") == digest:
                return version
        return None

    def publish(self, name: str, saved_model_dir: Path | str, metadata: dict[str, Any],
                version: int | None = None) -> int:
        """Copy a SavedModel in as the next integer version (atomically) and refresh models.config."""
        saved_model_dir = Path(saved_model_dir)
        if not (saved_model_dir / "saved_model.pb").is_file():
            raise RegistryError("not a SavedModel folder (no saved_model.pb)", path=str(saved_model_dir))
        metadata = {**metadata, "content_sha256": content_digest(saved_model_dir)}
        existing = self.storage.list_dirs(self.model_path(name))
        taken = {int(d) for d in existing if d.isdigit()}
        version = version or max(taken, default=0) + 1
        if version in taken:
            raise RegistryError(f"version {version} of {name!r} exists; versions are never overwritten",
                                path=self.model_path(name, version))
        with tempfile.TemporaryDirectory(prefix="captioner-publish-") as scratch:
            staged = Path(scratch) / "version"
            import shutil

            shutil.copytree(saved_model_dir, staged)
            record = {**metadata, "model_name": name, "version": version,
                      "registered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (staged / METADATA_JSON).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
            self.storage.publish_dir(staged, self.model_path(name, version))
        self.write_models_config()
        return version

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
        blocks = []
        for name in self.models():
            versions = self.versions(name)
            labels = {k: v for k, v in self.labels(name).items() if isinstance(v, int) and v in versions}
            serve = sorted({versions[-1], *labels.values()})
            lines = [f'    name: "{name}"', f'    base_path: "{self.model_path(name)}"',
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

    def __init__(self, root: str | Path, model_name: str = "captioner"):
        self.repository = ModelRepository(root)
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
