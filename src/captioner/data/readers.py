"""Readers for caption data sets; each returns a CaptionDataset with train/dev/test splits.

Supported layouts:

* ``flickr8k``: ``captions.tsv`` (``image<TAB>caption``), ``splits/{train,dev,test}.txt``, ``images/``
  (the layout of ``shared/data/flickr8k`` and of the synthetic generator).
* ``flickr8k_original``: Flickr8k as distributed: ``Flickr8k.token.txt`` (``image#n<TAB>caption``),
  ``Flickr_8k.{train,dev,test}Images.txt`` and an image folder (``Flicker8k_Dataset``, ``Flickr8k_Dataset``,
  ``Images`` or ``images``).
* ``coco``: ``captions_*.json`` (COCO captions format) + an image folder; ``captions_train*`` is the
  train split, ``captions_val*`` is halved deterministically into dev and test unless a
  ``captions_test*`` file exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from captioner.errors import DataError
from captioner.io_utils import file_sha256

log = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")


@dataclass
class CaptionDataset:
    name: str
    images_dir: Path
    captions: dict[str, list[str]]
    splits: dict[str, list[str]]
    missing_images: list[str] = field(default_factory=list)
    # The caption and split files read, in a fixed order: their bytes are part of the fingerprint.
    sources: list[Path] = field(default_factory=list)

    def image_path(self, image: str) -> Path:
        return self.images_dir / image

    def split_captions(self, split: str) -> dict[str, list[str]]:
        return {image: self.captions[image] for image in self.splits[split]}

    def all_images(self) -> list[str]:
        """Every image used by a split, each once, in a stable order."""
        seen: dict[str, None] = {}
        for split in SPLITS:
            for image in self.splits.get(split, []):
                seen.setdefault(image, None)
        return list(seen)

    def fingerprint(self) -> str:
        """A content fingerprint of the data: 16 hex digits that change when a caption, a split or
        an image changes, and only then.

        It hashes (1) the SHA-256 of each caption and split file the reader read (``sources``; for a
        data set built in memory, its captions instead), (2) the image names each split uses once
        limits and left-out images are applied, and (3) a listing of every file under the image
        folder with its size and modification time (``st_mtime_ns``), not the image bytes. Reading
        the bytes of a million images (~100 GB) would take longer than the training it guards; a
        listing costs one ``stat`` per file (seconds), and a tool that writes an image changes its
        size or mtime. So rewriting a caption file with the same text keeps the fingerprint, while
        touching an image changes it (conservative: a retraining run too many, never one too few).
        Hidden files (``.name``, e.g. an upload's temporary file) are not data and are skipped.
        """
        digest = hashlib.sha256()
        digest.update(f"{self.name}\n".encode())
        if self.sources:
            for path in self.sources:
                sha = file_sha256(path, missing="file not found (it was there when the data set was read)")
                digest.update(f"{Path(path).name}\t{sha}\n".encode())
        else:
            for image in self.all_images():
                digest.update(("\t".join([image, *self.captions[image]]) + "\n").encode())
        for split in SPLITS:
            digest.update(f"[{split}]\n".encode() + "\n".join(self.splits.get(split, [])).encode() + b"\n")
        digest.update(b"[images]\n" + "".join(sorted(_listing(self.images_dir))).encode())
        return digest.hexdigest()[:16]

    def limit(self, per_split: int) -> CaptionDataset:
        if per_split <= 0:
            return self
        splits = {s: images[:per_split] for s, images in self.splits.items()}
        return CaptionDataset(self.name, self.images_dir, self.captions, splits, self.missing_images, self.sources)


def _listing(folder: Path) -> list[str]:
    """``relative/path<TAB>size<TAB>mtime_ns`` for every non-hidden file under ``folder``.

    ``os.scandir`` rather than ``Path.rglob``: one ``stat`` per file and no Path objects, which is
    what keeps a million-image listing in seconds. Symbolic links to files are followed (their
    target is the data); links to folders are not, so a link cycle cannot loop.
    """
    lines: list[str] = []
    pending = [(Path(folder), "")]
    while pending:
        where, prefix = pending.pop()
        try:
            entries = list(os.scandir(where))
        except FileNotFoundError:
            raise DataError("image folder not found", path=str(where)) from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                pending.append((Path(entry.path), f"{prefix}{entry.name}/"))
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # a dangling link or a file deleted while listing: not data
                continue
            lines.append(f"{prefix}{entry.name}\t{st.st_size}\t{st.st_mtime_ns}\n")
    return lines


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError("file not found", path=str(path)) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 ({exc.reason})", path=str(path), line=line) from None
    return text.splitlines()


def _read_split_file(path: Path) -> list[str]:
    images = []
    for number, line in enumerate(_read_lines(path), 1):
        name = line.strip()
        if not name:
            continue
        if "\t" in name or " " in name:
            raise DataError(f"expected one image file name per line, got {line!r}", path=str(path), line=number)
        images.append(name)
    return images


def _check(dataset: CaptionDataset, split_files: dict[str, Path | str], caption_file: Path | str,
           on_missing: str) -> CaptionDataset:
    for split in SPLITS:
        images = dataset.splits.get(split, [])
        if not images:
            raise DataError(f"split {split!r} is empty", path=str(split_files.get(split, dataset.images_dir)))
        without = [image for image in images if image not in dataset.captions]
        if without:
            raise DataError(
                f"{len(without)} image(s) of split {split!r} have no caption in {caption_file}, "
                f"e.g. {', '.join(without[:3])}",
                path=str(split_files.get(split, caption_file)),
            )
    missing = [image for image in dataset.all_images() if not dataset.image_path(image).is_file()]
    if missing:
        message = (f"{len(missing)} captioned image(s) missing from {dataset.images_dir}, "
                   f"e.g. {', '.join(missing[:3])}")
        if on_missing == "error":
            raise DataError(message + " (set data.on_missing_image=skip to leave them out)",
                            path=str(caption_file))
        log.warning("%s: left out (data.on_missing_image=skip)", message)
        gone = set(missing)
        dataset.splits = {s: [i for i in images if i not in gone] for s, images in dataset.splits.items()}
        dataset.missing_images = missing
        for split in SPLITS:
            if not dataset.splits[split]:
                raise DataError(f"split {split!r} is empty once missing images are left out",
                                path=str(split_files.get(split, caption_file)))
    return dataset


def read_flickr8k(root: Path, on_missing: str = "error") -> CaptionDataset:
    root = Path(root)
    caption_file = root / "captions.tsv"
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(_read_lines(caption_file), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise DataError(f"expected 'image<TAB>caption', got {line[:80]!r}", path=str(caption_file),
                            line=number)
        captions.setdefault(parts[0].strip(), []).append(parts[1].strip())
    split_files = {s: root / "splits" / f"{s}.txt" for s in SPLITS}
    splits = {s: _read_split_file(p) for s, p in split_files.items()}
    dataset = CaptionDataset("flickr8k", root / "images", captions, splits,
                             sources=[caption_file, *split_files.values()])
    return _check(dataset, split_files, caption_file, on_missing)


def read_flickr8k_original(root: Path, on_missing: str = "error") -> CaptionDataset:
    root = Path(root)
    caption_file = root / "Flickr8k.token.txt"
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(_read_lines(caption_file), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        key = parts[0].strip()
        if len(parts) != 2 or "#" not in key or not parts[1].strip():
            raise DataError(f"expected 'image#n<TAB>caption', got {line[:80]!r}", path=str(caption_file),
                            line=number)
        captions.setdefault(key.rsplit("#", 1)[0], []).append(parts[1].strip())
    split_files = {s: root / f"Flickr_8k.{s}Images.txt" for s in SPLITS}
    splits = {s: _read_split_file(p) for s, p in split_files.items()}
    for folder in ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images"):
        if (root / folder).is_dir():
            images_dir = root / folder
            break
    else:
        raise DataError("no image folder (Flicker8k_Dataset, Flickr8k_Dataset, Images or images)", path=str(root))
    dataset = CaptionDataset("flickr8k", images_dir, captions, splits, sources=[caption_file, *split_files.values()])
    return _check(dataset, split_files, caption_file, on_missing)


def _read_coco_file(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg}", path=str(path), line=exc.lineno) from None
    try:
        names = {int(image["id"]): str(image["file_name"]) for image in data["images"]}
        captions: dict[str, list[str]] = {}
        for index, ann in enumerate(data["annotations"]):
            image_id = int(ann["image_id"])
            if image_id not in names:
                raise DataError(f"annotations[{index}].image_id={image_id} has no entry in 'images'",
                                path=str(path))
            text = str(ann["caption"]).strip()
            if not text:
                raise DataError(f"annotations[{index}].caption is empty", path=str(path))
            captions.setdefault(names[image_id], []).append(text)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"not a COCO captions file (missing or bad field {exc})", path=str(path)) from None
    return captions


def read_coco(root: Path, on_missing: str = "error") -> CaptionDataset:
    root = Path(root)
    files = {kind: sorted(root.glob(f"captions_{kind}*.json")) + sorted(root.glob(f"annotations/captions_{kind}*.json"))
             for kind in ("train", "val", "test")}
    if not files["train"] or not files["val"]:
        raise DataError("expected captions_train*.json and captions_val*.json", path=str(root))
    captions: dict[str, list[str]] = {}
    splits: dict[str, list[str]] = {}
    train = _read_coco_file(files["train"][0])
    val = _read_coco_file(files["val"][0])
    captions.update(train)
    captions.update(val)
    splits["train"] = sorted(train)
    if files["test"]:
        test = _read_coco_file(files["test"][0])
        captions.update(test)
        splits["dev"], splits["test"] = sorted(val), sorted(test)
    else:
        ordered = sorted(val, key=lambda name: hashlib.sha1(name.encode()).hexdigest())
        half = len(ordered) // 2
        splits["dev"], splits["test"] = sorted(ordered[:half]), sorted(ordered[half:])
    images_dir = root / "images" if (root / "images").is_dir() else root
    dataset = CaptionDataset("coco", images_dir, captions, splits,
                             sources=[files["train"][0], files["val"][0], *files["test"][:1]])
    split_files = {"train": files["train"][0], "dev": files["val"][0],
                   "test": (files["test"] or files["val"])[0]}
    return _check(dataset, split_files, files["train"][0], on_missing)


READERS = {"flickr8k": read_flickr8k, "flickr8k_original": read_flickr8k_original, "coco": read_coco}


def detect_format(root: Path) -> str:
    root = Path(root)
    if not root.exists():
        raise DataError("data folder not found (set data.root)", path=str(root))
    if (root / "captions.tsv").is_file():
        return "flickr8k"
    if (root / "Flickr8k.token.txt").is_file():
        return "flickr8k_original"
    if list(root.glob("captions_*.json")) or list(root.glob("annotations/captions_*.json")):
        return "coco"
    raise DataError("cannot tell the data format: expected captions.tsv, Flickr8k.token.txt or captions_*.json",
                    path=str(root))


def read_dataset(root: Path | str, fmt: str = "auto", on_missing: str = "error") -> CaptionDataset:
    root = Path(root)
    if fmt == "auto":
        fmt = detect_format(root)
    return READERS[fmt](root, on_missing)
