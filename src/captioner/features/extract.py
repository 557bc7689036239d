"""Feature extraction into a sharded, resumable cache.

A cache folder holds ``shard-NNNNN.npy`` files (float16 ``[n, N, C]``) and ``index.json`` mapping
each key (image file name, ``name#flip`` for a mirrored copy) to its shard and row. Shards and the
index are written atomically, so a killed extraction resumes where it stopped and a partial shard is
never read. Decoding (Pillow, in threads that release the GIL) overlaps with the backbone.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioner.config import FeaturesConfig
from captioner.constants import FEATURES_INDEX
from captioner.data.images import load_image
from captioner.errors import DataError
from captioner.io_utils import atomic_write_json

FLIP_SUFFIX = "#flip"


def cache_key(cfg: FeaturesConfig) -> str:
    return f"{cfg.backbone}-{cfg.weights}-{cfg.image_size}"


@dataclass
class FeatureStore:
    folder: Path

    def __post_init__(self):
        self.folder = Path(self.folder)
        self._index: dict[str, list[int]] | None = None
        self._shards: dict[int, np.ndarray] = {}

    @property
    def index(self) -> dict[str, list[int]]:
        if self._index is None:
            path = self.folder / FEATURES_INDEX
            if path.is_file():
                try:
                    self._index = json.loads(path.read_text())["rows"]
                except (json.JSONDecodeError, KeyError) as exc:
                    raise DataError(f"corrupt feature index ({exc}); delete the cache folder", path=str(path)) from None
            else:
                self._index = {}
        return self._index

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [key for key in keys if key not in self.index]

    def _shard(self, number: int) -> np.ndarray:
        if number not in self._shards:
            self._shards[number] = np.load(self.folder / f"shard-{number:05d}.npy", mmap_mode="r")
        return self._shards[number]

    def load(self, keys: Sequence[str]) -> np.ndarray:
        """Features of ``keys`` as one float16 array ``[len(keys), N, C]``."""
        absent = self.missing(keys)
        if absent:
            raise DataError(f"{len(absent)} image(s) not in the feature cache, e.g. {absent[:3]}",
                            path=str(self.folder))
        first = self._shard(self.index[keys[0]][0])
        out = np.empty((len(keys), *first.shape[1:]), dtype=np.float16)
        for i, key in enumerate(keys):
            shard, row = self.index[key]
            out[i] = self._shard(shard)[row]
        return out

    def append(self, keys: Sequence[str], features: np.ndarray) -> None:
        number = 1 + max((s for s, _ in self.index.values()), default=-1)
        path = self.folder / f"shard-{number:05d}.npy"
        # Written under a temporary name and renamed: a shard is whole or absent. No fsync: this is
        # a cache that can be rebuilt, and syncing ~100 MB shards costs a good part of the run.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as handle:
            np.save(handle, features.astype(np.float16, copy=False))
        os.replace(tmp, path)
        for row, key in enumerate(keys):
            self.index[key] = [number, row]
        atomic_write_json(self.folder / FEATURES_INDEX, {"rows": self.index})


def _batches(items: Sequence[tuple[str, Path, bool]], size: int, image_size: int, batch_size: int,
             workers: int = 2):
    """Yield ``(keys, uint8 pixels)`` batches; decoding runs ahead of the consumer in threads."""
    out: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def decode(item):
        key, path, flip = item
        pixels = load_image(path, image_size)
        return key, pixels[:, ::-1] if flip else pixels

    def produce():
        try:
            with ThreadPoolExecutor(workers) as pool:
                for start in range(0, len(items), batch_size):
                    if stop.is_set():
                        return
                    decoded = list(pool.map(decode, items[start:start + batch_size]))
                    out.put(([k for k, _ in decoded], np.stack([p for _, p in decoded])))
            out.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            out.put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def backbone_fn(backbone, batch_size: int):
    """A compiled call of the backbone on fixed-size batches (padding the last) to avoid retracing.

    The compiled function is kept on the backbone, so later extractions in the process reuse it.
    """
    import tensorflow as tf

    run = getattr(backbone, "_captioner_compiled", None)
    if run is None:
        @tf.function(reduce_retracing=True)
        def run(pixels):
            return backbone(tf.cast(pixels, tf.float32), training=False)

        backbone._captioner_compiled = run

    def call(pixels: np.ndarray) -> np.ndarray:
        n = len(pixels)
        if n < batch_size:
            pixels = np.concatenate([pixels, np.zeros((batch_size - n, *pixels.shape[1:]), pixels.dtype)])
        return run(pixels).numpy()[:n]

    return call


def extract_features(dataset, images: Sequence[str], cfg: FeaturesConfig, cache_folder: Path | str,
                     *, flip: Sequence[str] = (), progress: bool = True, backbone=None) -> FeatureStore:
    """Make sure every image in ``images`` (and the mirrored copy of those in ``flip``) is cached."""
    from tqdm import tqdm

    from captioner.features.backbones import build_backbone

    store = FeatureStore(Path(cache_folder))
    wanted = [(name, dataset.image_path(name), False) for name in images]
    wanted += [(name + FLIP_SUFFIX, dataset.image_path(name), True) for name in flip]
    todo = [item for item in wanted if item[0] not in store.index]
    if not todo:
        return store
    store.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(store.folder / "backbone.json", {"backbone": cfg.backbone, "weights": cfg.weights,
                                                       "image_size": cfg.image_size})
    backbone = backbone or build_backbone(cfg.backbone, cfg.weights, cfg.image_size)
    run = backbone_fn(backbone, cfg.batch_size)
    pending_keys: list[str] = []
    pending: list[np.ndarray] = []
    with tqdm(total=len(todo), desc=f"features ({cfg.backbone})", unit="img", disable=not progress) as bar:
        for keys, pixels in _batches(todo, len(todo), cfg.image_size, cfg.batch_size):
            pending.append(run(pixels).astype(np.float16))
            pending_keys.extend(keys)
            bar.update(len(keys))
            if len(pending_keys) >= cfg.shard_size:
                store.append(pending_keys, np.concatenate(pending))
                pending_keys, pending = [], []
        if pending_keys:
            store.append(pending_keys, np.concatenate(pending))
    return store
