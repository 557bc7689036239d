"""Local paths and ``gs://`` URIs behind one small interface, for the model repository.

GCS goes through ``google-cloud-storage``; ``STORAGE_EMULATOR_HOST`` points it at an emulator (the
tests start ``gcp-storage-emulator``). Paths are ``/``-joined strings in both cases.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from captioner.errors import CaptionerError

# A serving container (TF Serving, the gateway) usually runs as another user than the pipeline that
# registers models, so what the repository holds is world-readable whatever the umask or mkdtemp say.
DIR_MODE, FILE_MODE = 0o755, 0o644


class PublishConflict(CaptionerError):
    """Another writer already published (or is publishing) into the target version."""


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def make_readable(root: Path) -> None:
    """Folders 0755 and files 0644 under ``root`` (and ``root`` itself)."""
    root = Path(root)
    if root.is_file():
        os.chmod(root, FILE_MODE)
        return
    os.chmod(root, DIR_MODE)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), DIR_MODE)
        for name in files:
            os.chmod(os.path.join(folder, name), FILE_MODE)


def _mkdirs_readable(folder: Path) -> None:
    """``mkdir -p`` whose new folders are 0755 even under a restrictive umask."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir()
            os.chmod(path, DIR_MODE)


class LocalStorage:
    def exists(self, path: str) -> bool:
        return Path(path).exists()

    def read_text(self, path: str) -> str:
        return Path(path).read_text(encoding="utf-8")

    def write_text(self, path: str, text: str) -> None:
        """Temp file, chmod 0644, rename: readers see the old or the new file, never a private one."""
        target = Path(path)
        _mkdirs_readable(target.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(text.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def list_dirs(self, path: str) -> list[str]:
        folder = Path(path)
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def publish_dir(self, source: Path, target: str) -> None:
        """Copy ``source`` to ``target`` so that ``target`` appears complete (and readable) in one rename.

        Raises ``PublishConflict`` if ``target`` exists: a version is never overwritten."""
        target_path = Path(target)
        _mkdirs_readable(target_path.parent)
        # A fresh name of our own: the cleanup below can never reach a folder someone else made.
        staging = Path(tempfile.mkdtemp(prefix=f".{target_path.name}.partial-", dir=target_path.parent))
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            make_readable(staging)
            if target_path.exists():
                raise PublishConflict("this version exists; versions are never overwritten", path=target)
            try:
                os.rename(staging, target_path)  # refuses a non-empty target: never overwrite a version
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise PublishConflict("another writer published this version first", path=target) from None
                raise
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
        (TF Serving and ``ModelRepository.versions`` both need it), so a partial upload never shows.

        Every object is created with ``if_generation_match=0`` (only if no object has that name), so
        of two publishers writing the same version the second fails at its first clash instead of
        interleaving its files with the first's; it then deletes the objects it created (by their
        generation, so never the winner's) and raises ``PublishConflict``."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        if self.exists(target):
            raise PublishConflict("this version exists; versions are never overwritten", path=target)
        files = sorted(p for p in Path(source).rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == "saved_model.pb")
        created = []
        try:
            for path in files:
                blob = self._blob(join(target, path.relative_to(source).as_posix()))
                blob.upload_from_filename(str(path), if_generation_match=0)
                created.append(blob)
        except BaseException as exc:
            for blob in created:
                with contextlib.suppress(NotFound, PreconditionFailed):
                    blob.delete(if_generation_match=blob.generation)
            if isinstance(exc, PreconditionFailed):
                raise PublishConflict("another writer is publishing this version (an object of it already "
                                      "existed); nothing of this upload was kept", path=target) from None
            raise

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
