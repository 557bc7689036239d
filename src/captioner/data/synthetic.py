"""A deterministic synthetic captioning data set: coloured shapes with positions and relations.

It is the offline default: it needs no download, trains in minutes, and its captions are fully
determined by the picture (modulo phrasing), so a working model reaches BLEU-4 near 1. It is
written in the ``flickr8k`` layout (captions.tsv, splits/, images/) and read by the same reader.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from PIL import Image, ImageDraw

from captioner.config import SyntheticConfig
from captioner.constants import COMPLETE_MARKER
from captioner.errors import CaptionerError, DataError
from captioner.io_utils import atomic_directory, check_replaceable, only_tree

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 70, 230), "yellow": (240, 220, 30),
           "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (40, 40, 40)


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float) -> None:
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def _one(rng: random.Random, size: int) -> tuple[Image.Image, list[str]]:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    where = rng.choice(["left", "right", "top", "bottom"])
    r = size * rng.uniform(0.16, 0.22)
    jitter = size * rng.uniform(-0.06, 0.06)
    centre = {"left": (size * 0.27, size / 2 + jitter), "right": (size * 0.73, size / 2 + jitter),
              "top": (size / 2 + jitter, size * 0.27), "bottom": (size / 2 + jitter, size * 0.73)}[where]
    _draw(draw, shape, colour, *centre, r)
    part = {"left": "left", "right": "right", "top": "top", "bottom": "bottom"}[where]
    captions = [
        f"a {colour} {shape} on the {part}",
        f"there is a {colour} {shape} on the {part}",
        f"a {colour} {shape} in the {part} of the image",
        f"one {colour} {shape} on the {part} side",
        f"a single {colour} {shape} at the {part}",
    ]
    return img, captions


def _two(rng: random.Random, size: int) -> tuple[Image.Image, list[str]]:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    while True:
        a = (rng.choice(SHAPES), rng.choice(list(COLOURS)))
        b = (rng.choice(SHAPES), rng.choice(list(COLOURS)))
        if a != b:
            break
    horizontal = rng.random() < 0.5
    r = size * rng.uniform(0.13, 0.17)
    jitter = size * rng.uniform(-0.05, 0.05)
    if horizontal:
        pa, pb = (size * 0.27, size / 2 + jitter), (size * 0.73, size / 2 - jitter)
    else:
        pa, pb = (size / 2 + jitter, size * 0.27), (size / 2 - jitter, size * 0.73)
    _draw(draw, a[0], a[1], *pa, r)
    _draw(draw, b[0], b[1], *pb, r)
    an, bn = f"a {a[1]} {a[0]}", f"a {b[1]} {b[0]}"
    if horizontal:
        captions = [
            f"{an} to the left of {bn}",
            f"{bn} to the right of {an}",
            f"{an} is left of {bn}",
            f"{bn} is right of {an}",
            f"{an} and {bn} side by side",
        ]
    else:
        captions = [
            f"{an} above {bn}",
            f"{bn} below {an}",
            f"{an} is on top of {bn}",
            f"{bn} is under {an}",
            f"{an} over {bn}",
        ]
    return img, captions


SYNTHETIC_SPLITS = ("train", "dev", "test")
IMAGE_NAME = re.compile(r"(?:train|dev|test)_\d{5,}\.png")


def _listed_images(root: Path) -> set[str] | None:
    """The image names our splits and captions.tsv list (None if one of them cannot be read)."""
    names: set[str] = set()
    try:
        for split in SYNTHETIC_SPLITS:
            path = root / "splits" / f"{split}.txt"
            if path.is_file():
                names.update(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        captions = root / "captions.tsv"
        if captions.is_file():
            names.update(line.split("\t", 1)[0] for line in captions.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError):
        return None
    names.discard("")
    return names


def is_synthetic_folder(root: Path) -> bool:
    """A folder ``generate`` wrote and nothing else: its marker (the generator's parameters),
    captions.tsv, splits/{train,dev,test}.txt and, in images/, only images those files list.

    Replacing the folder removes its whole tree, so a user's file anywhere in it (a photo put in
    images/, notes in splits/) makes it not ours.
    """
    try:
        params = json.loads((root / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not (isinstance(params, dict) and "seed" in params):
        return False
    listed = _listed_images(root)
    if listed is None:
        return False
    ours = {"captions.tsv", COMPLETE_MARKER, *(f"splits/{split}.txt" for split in SYNTHETIC_SPLITS)}
    # Only names of the form generate() gives: a user's photo stays theirs even if listed.
    ours.update(f"images/{name}" for name in listed if IMAGE_NAME.fullmatch(name))
    return only_tree(root, ours.__contains__, {"images", "splits"})


def generate(root: Path | str, cfg: SyntheticConfig) -> Path:
    """Write the data set to ``root`` (atomically) unless a complete copy with this config is there.

    ``root`` must be new, empty, or a synthetic data set written here before (which is replaced when
    its parameters differ): a user's folder is never replaced.
    """
    root = Path(root)
    params = json.dumps(cfg.__dict__, sort_keys=True)
    marker = root / COMPLETE_MARKER
    if marker.is_file() and marker.read_text() == params:
        return root
    try:
        check_replaceable(root, is_synthetic_folder)
    except CaptionerError:
        raise DataError("data.format=synthetic would generate a data set here, but this folder is not empty and "
                        "is not a synthetic data set this project made; nothing was changed. If it holds your "
                        f"own captioned images, give their config, e.g. --config flickr8k --set data.root={root}",
                        path=str(root), field="data.root") from None
    with atomic_directory(root, is_synthetic_folder) as tmp:
        (tmp / "images").mkdir()
        (tmp / "splits").mkdir()
        rng = random.Random(cfg.seed)
        lines = []
        counts = {"train": cfg.num_train, "dev": cfg.num_dev, "test": cfg.num_test}
        for split, count in counts.items():
            names = []
            for index in range(count):
                img, captions = (_one if rng.random() < 0.4 else _two)(rng, cfg.image_size)
                name = f"{split}_{index:05d}.png"
                img.save(tmp / "images" / name)
                names.append(name)
                lines.extend(f"{name}\t{caption}" for caption in captions)
            (tmp / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
        (tmp / "captions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / COMPLETE_MARKER).write_text(params)
    return root
