"""Feature extraction into a sharded, resumable, content-addressed cache.

A cache folder holds ``shard-NNNNN.npy`` files (float16 ``[n, N, C]``) and ``index.json`` mapping
each key to its shard and row. Shards and the index are written atomically, so a killed extraction
resumes where it stopped and a partial shard is never read. Decoding (Pillow, in threads that
release the GIL) overlaps with the backbone.

Throughput (issue #11): on two cores, JPEG decoding and the backbone share the CPU, so files -> cache
cannot beat ``1 / (1/decode_rate + 1/backbone_rate)``, each rate measured on both cores
(``benchmarks/bench_extract_limit.py`` measures the three and the limit in one run). Against that
limit the pipeline decodes a plain JPEG once (``decode_file``), casts the features to float16 in
the backbone's graph, and streams each shard's rows to its file as they come.

Keys are image CONTENT: the SHA-256 of the file's bytes (``<hash>#flip`` for the mirrored copy). A
data set grown by 100 images costs 100 extractions, and a renamed or copied image none. Hashing
every file on every run would read the whole data set, so ``hashes.json`` remembers each path's
hash with the size and ``st_mtime_ns`` it had: only new or changed files are read again (git's
index does the same). ``extract_features`` returns the store with a ``names`` view (image name ->
content key) so that readers keep asking for images by name; ``FeatureStore.export`` writes a
self-contained copy keyed by name (what the pipeline passes from step to step).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captioner.config import FeaturesConfig
from captioner.constants import FEATURES_INDEX
from captioner.data.images import PREPROCESSING_VERSION, load_image
from captioner.errors import DataError
from captioner.io_utils import atomic_write_json, atomic_write_text, exclusive_lock, file_sha256, read_json_dict

log = logging.getLogger(__name__)
FLIP_SUFFIX = "#flip"
HASHES_FILE = "hashes.json"
BACKBONE_FILE = "backbone.json"


def cache_key(cfg: FeaturesConfig) -> str:
    # Features depend on how images were preprocessed: a new preprocessing never reads old features.
    return f"{cfg.backbone}-{cfg.weights}-{cfg.image_size}-pre{PREPROCESSING_VERSION}"


def store_set_up(cfg: FeaturesConfig) -> dict[str, str | int]:
    """What a store's features depend on, recorded in its backbone.json."""
    return {"backbone": cfg.backbone, "weights": cfg.weights, "image_size": cfg.image_size,
            "preprocessing": PREPROCESSING_VERSION}


def _check_set_up(folder: Path, cfg: FeaturesConfig) -> None:
    """Refuse a store whose features came from another backbone, weights, image size or
    preprocessing: keys are image contents only, so its features would be returned as if current.

    The default stores are one folder per ``cache_key``, but ``extract --cache DIR`` (or any explicit
    folder) can be reused after the config changed.
    """
    path = folder / BACKBONE_FILE
    if not path.exists():
        return
    recorded = read_json_dict(path)
    if recorded is None:
        raise DataError("the feature cache's backbone.json is not a JSON object; cannot tell what set-up its "
                        "features came from (use another cache folder)", path=str(path))
    if "preprocessing" not in recorded and folder.name == cache_key(cfg):
        # Written before the version was recorded, into the folder whose name carries it.
        recorded = {**recorded, "preprocessing": PREPROCESSING_VERSION}
    wanted = store_set_up(cfg)
    differ = [f"{name}: cache has {recorded.get(name, '(not recorded)')!r}, config has {value!r}"
              for name, value in wanted.items() if recorded.get(name) != value]
    if differ:
        raise DataError(f"this feature cache holds features of another set-up ({'; '.join(differ)}); reusing them "
                        "would give stale features. Use another cache folder for this config (or the default "
                        "one, which is kept per set-up)", path=str(folder), field="features")


@dataclass
class FeatureStore:
    """Cached features in ``folder``. ``names`` (image name -> stored key), when set, is the view
    of one data set over a content-addressed store; without it, keys are used as they are."""

    folder: Path
    names: dict[str, str] | None = None
    # Stored keys the last extract_features call computed with the backbone (the rest were cached).
    extracted: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.folder = Path(self.folder)
        self._index: dict[str, list[int]] | None = None
        self._shards: dict[int, np.ndarray] = {}

    def key(self, name: str) -> str:
        return self.names.get(name, name) if self.names is not None else name

    def reload(self) -> None:
        """Forget what was read from disk (another process may have added shards)."""
        self._index = None
        self._shards = {}

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
        return [key for key in keys if self.key(key) not in self.index]

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
        first = self._shard(self.index[self.key(keys[0])][0])
        out = np.empty((len(keys), *first.shape[1:]), dtype=np.float16)
        for i, key in enumerate(keys):
            shard, row = self.index[self.key(key)]
            out[i] = self._shard(shard)[row]
        return out

    def append(self, keys: Sequence[str], features: np.ndarray) -> None:
        with self.new_shard(len(keys), features.shape[1:]) as shard:
            shard.write(features)
        self.commit(shard.number, keys)

    def new_shard(self, rows: int, row_shape: Sequence[int]) -> ShardFile:
        """The next shard, to be filled with ``rows`` rows and then handed to ``commit``."""
        number = 1 + max((s for s, _ in self.index.values()), default=-1)
        return ShardFile(self.folder / f"shard-{number:05d}.npy", number, rows, tuple(row_shape))

    def commit(self, number: int, keys: Sequence[str]) -> None:
        """Index ``keys`` as rows 0.. of the (complete, renamed) shard ``number``."""
        for row, key in enumerate(keys):
            self.index[key] = [number, row]
        atomic_write_json(self.folder / FEATURES_INDEX, {"rows": self.index})

    def export(self, names: Sequence[str], dest: Path | str, shard_size: int = 2048) -> FeatureStore:
        """Copy the features of ``names`` into a store at ``dest`` keyed by those names.

        The copy stands alone (a pipeline artifact must not point into a cache that another
        machine does not have). Names already in ``dest`` are kept, so a killed copy resumes.
        """
        out = FeatureStore(Path(dest))
        out.folder.mkdir(parents=True, exist_ok=True)
        if (self.folder / BACKBONE_FILE).is_file():
            atomic_write_json(out.folder / BACKBONE_FILE, json.loads((self.folder / BACKBONE_FILE).read_text()))
        todo = out.missing(dict.fromkeys(names))
        for start in range(0, len(todo), shard_size):
            chunk = todo[start:start + shard_size]
            out.append(chunk, self.load(chunk))
        return out


class ShardFile:
    """One shard's ``.npy`` file (float16), written batch by batch under a temporary name and
    renamed when all its rows are in: a shard is whole or absent, and its features never sit in
    memory as one array to be concatenated and copied out. No fsync: this is a cache that can be
    rebuilt, and syncing ~150 MB shards costs a good part of the run.

    The bytes are those ``np.save`` writes for the whole array (same version 1.0 header).
    """

    def __init__(self, path: Path, number: int, rows: int, row_shape: tuple[int, ...]):
        self.path, self.number, self.rows, self.row_shape = path, number, rows, row_shape
        self.written = 0
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._handle = self._tmp.open("wb")
        np.lib.format.write_array_header_1_0(self._handle, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
            "shape": (rows, *row_shape)})

    def write(self, features: np.ndarray) -> None:
        if features.shape[1:] != self.row_shape or self.written + len(features) > self.rows:
            raise ValueError(f"shard {self.path.name} holds {self.rows} rows of {self.row_shape}; got "
                             f"{features.shape} after {self.written} rows")
        self._handle.write(np.ascontiguousarray(features, dtype=np.float16).data)
        self.written += len(features)

    def finish(self) -> None:
        """Rename the file into place (it must hold all its rows)."""
        if self.written != self.rows:
            self.discard()
            raise ValueError(f"shard {self.path.name} got {self.written} of its {self.rows} rows")
        self._handle.close()
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        self._handle.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, kind, value, trace) -> None:
        if kind is None:
            self.finish()
        else:
            self.discard()


def _content_key(path: Path) -> str:
    # 128 bits: no collision among any number of images we will see.
    return file_sha256(path, missing="image file not found")[:32]


def content_keys(paths: Iterable[Path], hashes_file: Path, workers: int = 4) -> dict[Path, str]:
    """The content key of each file, reading only files whose size or mtime changed since the
    hashes recorded in ``hashes_file`` (which is updated)."""
    try:
        known = json.loads(hashes_file.read_text()) if hashes_file.is_file() else {}
    except json.JSONDecodeError:
        log.warning("%s is damaged: every image will be hashed again", hashes_file)
        known = {}
    keys: dict[Path, str] = {}
    todo: list[tuple[Path, str, list[int]]] = []
    for path in dict.fromkeys(paths):
        where = str(Path(path).absolute())
        try:
            st = path.stat()
        except FileNotFoundError:
            raise DataError("image file not found", path=str(path)) from None
        seen = known.get(where)
        if seen and seen[0] == st.st_size and seen[1] == st.st_mtime_ns:
            keys[path] = seen[2]
        else:
            todo.append((path, where, [st.st_size, st.st_mtime_ns]))
    if todo:
        with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL on large buffers
            for (path, where, stat), key in zip(todo, pool.map(lambda item: _content_key(item[0]), todo),
                                                strict=True):
                keys[path] = key
                known[where] = [*stat, key]
        atomic_write_text(hashes_file, json.dumps(known, separators=(",", ":")))
    return keys


def _locked(folder: Path):
    """One extraction at a time per store: two runs appending at once would pick the same shard
    number. A file system without ``flock`` (some network mounts) runs unlocked, with a warning."""
    return exclusive_lock(folder / ".lock", "extracting")


def decode_file(path: Path, size: int) -> np.ndarray:
    """``load_image(path, size)`` with the file read here, so that an error names the path. A plain
    JPEG of the backbone's size is decoded once (``images._needs_nothing_more``)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return load_image(path, size)  # which words the error
    return load_image(data, size, label=str(path))


def _batches(items: Sequence[tuple[str, Path, bool]], image_size: int, batch_size: int, workers: int = 2):
    """Yield ``(keys, uint8 pixels)`` batches; decoding runs ahead of the consumer in threads."""
    out: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def decode(item):
        key, path, flip = item
        pixels = decode_file(path, image_size)
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
    """A compiled call of the backbone on fixed-size batches (padding the last) to avoid retracing,
    giving the float16 features the cache stores.

    The cast is in the graph: TensorFlow's vectorised float32 -> float16 conversion rounds as
    NumPy's ``astype`` does (to nearest even) at a fraction of its cost, and half as many bytes
    come back. The compiled function is kept on the backbone, so later extractions reuse it.
    """
    import tensorflow as tf

    run = getattr(backbone, "_captioner_compiled_f16", None)
    if run is None:
        @tf.function(reduce_retracing=True)
        def run(pixels):
            return tf.cast(backbone(tf.cast(pixels, tf.float32), training=False), tf.float16)

        backbone._captioner_compiled_f16 = run

    def call(pixels: np.ndarray) -> np.ndarray:
        n = len(pixels)
        if n < batch_size:
            pixels = np.concatenate([pixels, np.zeros((batch_size - n, *pixels.shape[1:]), pixels.dtype)])
        return run(pixels).numpy()[:n]

    return call


def extract_features(dataset, images: Sequence[str], cfg: FeaturesConfig, cache_folder: Path | str,
                     *, flip: Sequence[str] = (), progress: bool = True, backbone=None,
                     decode_workers: int = 2) -> FeatureStore:
    """Make sure every image in ``images`` (and the mirrored copy of those in ``flip``) is cached.

    Runs the backbone only over image contents the store does not hold yet; returns the store
    with the ``names`` view of these images and ``extracted`` set to the keys it computed.
    ``decode_workers`` threads decode images ahead of the backbone.
    """
    from tqdm import tqdm

    from captioner.features.backbones import build_backbone

    store = FeatureStore(Path(cache_folder))
    store.folder.mkdir(parents=True, exist_ok=True)
    with _locked(store.folder):
        _check_set_up(store.folder, cfg)
        # First, so that a folder holding only the hashes of a killed run still reads as a store.
        atomic_write_json(store.folder / BACKBONE_FILE, store_set_up(cfg))
        store.reload()
        paths = {name: dataset.image_path(name) for name in dict.fromkeys([*images, *flip])}
        content = content_keys(paths.values(), store.folder / HASHES_FILE)
        names = {name: content[paths[name]] for name in images}
        names.update({name + FLIP_SUFFIX: content[paths[name]] + FLIP_SUFFIX for name in flip})
        store.names = names
        wanted = {names[name]: (names[name], paths[name], False) for name in images}
        wanted.update({names[name + FLIP_SUFFIX]: (names[name + FLIP_SUFFIX], paths[name], True) for name in flip})
        todo = [item for key, item in wanted.items() if key not in store.index]
        if not todo:
            return store
        backbone = backbone or build_backbone(cfg.backbone, cfg.weights, cfg.image_size)
        run = backbone_fn(backbone, cfg.batch_size)
        # Whole batches per shard: the first batch that reaches shard_size rows closes it.
        per_shard = -(-cfg.shard_size // cfg.batch_size) * cfg.batch_size
        shard: ShardFile | None = None
        shard_keys: list[str] = []
        try:
            with tqdm(total=len(todo), desc=f"features ({cfg.backbone})", unit="img",
                      disable=not progress) as bar:
                for keys, pixels in _batches(todo, cfg.image_size, cfg.batch_size, decode_workers):
                    features = run(pixels)
                    if shard is None:
                        rows = min(per_shard, len(todo) - len(store.extracted))
                        shard = store.new_shard(rows, features.shape[1:])
                    shard.write(features)
                    shard_keys.extend(keys)
                    store.extracted.extend(keys)
                    bar.update(len(keys))
                    if shard.written == shard.rows:
                        shard.finish()
                        store.commit(shard.number, shard_keys)
                        shard, shard_keys = None, []
        finally:
            if shard is not None:  # stopped part-way: no partial shard is left behind
                shard.discard()
    return store
