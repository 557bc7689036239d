"""Local paths and ``gs://`` URIs behind one small interface, for the model repository.

GCS goes through ``google-cloud-storage``; ``STORAGE_EMULATOR_HOST`` points it at an emulator (the
tests start ``gcp-storage-emulator``). Paths are ``/``-joined strings in both cases.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


class LocalStorage:
    def exists(self, path: str) -> bool:
        return Path(path).exists()

    def read_text(self, path: str) -> str:
        return Path(path).read_text(encoding="utf-8")

    def write_text(self, path: str, text: str) -> None:
        from captioner.io_utils import atomic_write_text

        atomic_write_text(path, text)

    def list_dirs(self, path: str) -> list[str]:
        folder = Path(path)
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def publish_dir(self, source: Path, target: str) -> None:
        """Copy ``source`` to ``target`` so that ``target`` appears complete in one rename."""
        target_path = Path(target)
        target_path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh name of our own: the cleanup below can never reach a folder someone else made.
        staging = Path(tempfile.mkdtemp(prefix=f".{target_path.name}.partial-", dir=target_path.parent))
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            os.rename(staging, target_path)  # fails if the version exists: never overwrite one
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def download_dir(self, source: str, target: Path) -> Path:
        shutil.copytree(source, target, dirs_exist_ok=True)
        return target


class GCSStorage:
    def __init__(self, client=None):
        from google.cloud import storage

        if client is None:
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"),
                                        credentials=AnonymousCredentials())
            else:
                client = storage.Client()
        self.client = client

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        if not uri.startswith("gs://"):
            raise ValueError(f"not a gs:// URI: {uri}")
        bucket, _, name = uri[5:].partition("/")
        return bucket, name

    def _blob(self, uri: str):
        bucket, name = self.split(uri)
        return self.client.bucket(bucket).blob(name)

    def exists(self, uri: str) -> bool:
        if self._blob(uri).exists():
            return True
        bucket, name = self.split(uri)
        return any(True for _ in self.client.list_blobs(bucket, prefix=name.rstrip("/") + "/", max_results=1))

    def read_text(self, uri: str) -> str:
        return self._blob(uri).download_as_text()

    def write_text(self, uri: str, text: str) -> None:
        self._blob(uri).upload_from_string(text)

    def list_dirs(self, uri: str) -> list[str]:
        bucket, name = self.split(uri)
        prefix = name.rstrip("/") + "/" if name else ""
        blobs = self.client.list_blobs(bucket, prefix=prefix, delimiter="/")
        list(blobs)  # the prefixes are filled once the pages are read
        return sorted(p[len(prefix):].rstrip("/") for p in blobs.prefixes)

    def publish_dir(self, source: Path, target: str) -> None:
        """Upload everything, ``saved_model.pb`` last: until it lands the version is not loadable
        (TF Serving and ``ModelRepository.versions`` both need it), so a partial upload never shows."""
        files = sorted(p for p in Path(source).rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == "saved_model.pb")
        for path in files:
            self._blob(join(target, path.relative_to(source).as_posix())).upload_from_filename(str(path))

    def download_dir(self, source: str, target: Path) -> Path:
        bucket, name = self.split(source)
        prefix = name.rstrip("/") + "/"
        for blob in self.client.list_blobs(bucket, prefix=prefix):
            local = Path(target) / blob.name[len(prefix):]
            local.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(local))
        return Path(target)


def storage_for(location: str):
    return GCSStorage() if str(location).startswith("gs://") else LocalStorage()
