"""Atomic file and directory writes: a half-written output never looks complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from captioner.errors import CaptionerError, DataError


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def check_replaceable(path: Path | str, owned: Callable[[Path], bool] | None = None, *, hint: str = "") -> None:
    """Raise unless ``path`` is absent, an empty folder, or a folder ``owned`` recognises as ours.

    The one rule every command follows before it replaces a folder: never remove what it did not make.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise CaptionerError(f"exists and is not a folder{hint}; refusing to replace it", path=str(path))
    if not any(path.iterdir()):
        return
    if owned is not None and owned(path):
        return
    raise CaptionerError(f"not empty and not written by captioner{hint}; refusing to replace or delete "
                         "anything in it (choose a new or empty folder)", path=str(path))


def only_tree(path: Path, files: Callable[[str], bool], folders: Collection[str]) -> bool:
    """True when everything under folder ``path``, at any depth, is what we write there.

    Each file's path relative to ``path`` (``/``-separated) must satisfy ``files`` and each
    sub-folder's be one of ``folders``; a symlink or any other kind of entry makes it not ours. The
    whole tree is checked because replacing the folder removes the whole tree: a user's file put in
    a sub-folder would go with it.
    """
    def walk(folder: Path, prefix: str) -> bool:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return False
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_symlink():
                return False
            if entry.is_dir(follow_symlinks=False):
                if rel not in folders or not walk(Path(entry.path), rel + "/"):
                    return False
            elif not (entry.is_file(follow_symlinks=False) and files(rel)):
                return False
        return True

    return walk(Path(path), "")


def file_sha256(path: Path | str, *, missing: str = "file not found") -> str:
    """Hex SHA-256 of a file's bytes, read in chunks; a missing file is a ``DataError`` saying ``missing``."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise DataError(missing, path=str(path)) from None
    return digest.hexdigest()


def read_json_dict(path: Path | str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is unreadable, not JSON, or not an object
    (callers use this to recognise their own files without trusting a same-named one)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def atomic_directory(path: Path | str, owned: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename.

    An existing ``path`` is replaced only if it is empty or ``owned(path)`` says that captioner wrote
    it (checked before the work starts and again before the swap); anything else raises
    ``CaptionerError`` and nothing is touched.
    """
    path = Path(path)
    check_replaceable(path, owned)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    holder: Path | None = None
    try:
        yield tmp
        check_replaceable(path, owned)
        if path.is_dir() and not any(path.iterdir()):
            os.rmdir(path)  # only ever removes an empty folder
        if path.exists():
            # The old folder goes into a fresh folder of our own (never a fixed sibling name that a
            # user's folder could have), so the removal below can only reach what we moved there.
            holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, holder / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            if holder is not None:
                os.replace(holder / path.name, path)  # put the old one back rather than lose both
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern[str]) -> Iterator[None]:
    """Run the body with file descriptor 2 captured, then write back every line that ``noise`` does
    not match. At the descriptor because the lines come from C++ or a child process (Java), which
    Python's ``sys.stderr`` never sees; into a temporary file, not a pipe, so a long output cannot
    block the writer. Errors still reach the user, after the body."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr to protect
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not noise.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


@contextlib.contextmanager
def exclusive_lock(path: Path | str, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent) for the body. A file system without
    ``flock`` (some network mounts) runs the body unlocked, with a warning naming ``what``."""
    import fcntl
    import logging

    with Path(path).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            logging.getLogger(__name__).warning("cannot lock %s (%s): %s without a lock", path, exc, what)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
