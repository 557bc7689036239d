"""The feature cache is keyed by image content: only new or changed images go through the backbone."""

import os

import numpy as np
import pytest
from PIL import Image

from captioner.config import FeaturesConfig
from captioner.data.readers import CaptionDataset
from captioner.features.backbones import build_backbone
from captioner.features.extract import FeatureStore, extract_features

pytestmark = pytest.mark.unit
CFG = FeaturesConfig(backbone="patches", weights="none", image_size=32, batch_size=8)


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(CFG.backbone, CFG.weights, CFG.image_size)


def _write_images(folder, names, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)


def _dataset(folder):
    return CaptionDataset("test", folder, {}, {})


def test_only_new_images_are_extracted(tmp_path, backbone):
    images, cache = tmp_path / "images", tmp_path / "cache"
    first = [f"{i:03d}.png" for i in range(20)]
    _write_images(images, first, seed=0)
    store = extract_features(_dataset(images), first, CFG, cache, progress=False, backbone=backbone)
    assert len(store.extracted) == 20 and len(store.index) == 20
    before = store.load(first)

    added = [f"new-{i:02d}.png" for i in range(10)]
    _write_images(images, added, seed=1)
    store = extract_features(_dataset(images), first + added, CFG, cache, progress=False, backbone=backbone)
    assert len(store.extracted) == 10 and len(store.index) == 30
    assert set(store.extracted) == {store.key(name) for name in added}
    np.testing.assert_array_equal(store.load(first), before)

    # A fresh store object over the folder (another process) sees the same rows.
    again = extract_features(_dataset(images), first + added, CFG, cache, progress=False, backbone=backbone)
    assert again.extracted == [] and len(FeatureStore(cache).index) == 30


def test_renamed_or_duplicated_image_is_not_extracted_again(tmp_path, backbone):
    images, cache = tmp_path / "images", tmp_path / "cache"
    names = ["a.png", "b.png", "c.png"]
    _write_images(images, names, seed=2)
    store = extract_features(_dataset(images), names, CFG, cache, progress=False, backbone=backbone)
    features_a = store.load(["a.png"])

    os.rename(images / "a.png", images / "renamed.png")
    (images / "copy-of-b.png").write_bytes((images / "b.png").read_bytes())
    names = ["renamed.png", "b.png", "c.png", "copy-of-b.png"]
    store = extract_features(_dataset(images), names, CFG, cache, progress=False, backbone=backbone)
    assert store.extracted == [] and len(store.index) == 3
    np.testing.assert_array_equal(store.load(["renamed.png"]), features_a)

    _write_images(images, ["c.png"], seed=3)  # new content under an old name
    store = extract_features(_dataset(images), names, CFG, cache, progress=False, backbone=backbone)
    assert store.extracted == [store.key("c.png")] and len(store.index) == 4


def test_export_is_a_standalone_store_keyed_by_name(tmp_path, backbone):
    images = tmp_path / "images"
    names = ["x.png", "y.png"]
    _write_images(images, names, seed=4)
    store = extract_features(_dataset(images), names, CFG, tmp_path / "cache", flip=["x.png"], progress=False,
                             backbone=backbone)
    copy = store.export([*names, "x.png#flip"], tmp_path / "artifact")
    reread = FeatureStore(tmp_path / "artifact")
    assert set(reread.index) == {"x.png", "y.png", "x.png#flip"} and copy.folder == reread.folder
    np.testing.assert_array_equal(reread.load(names), store.load(names))
    np.testing.assert_array_equal(reread.load(["x.png#flip"]), store.load(["x.png#flip"]))
    assert not np.array_equal(reread.load(["x.png#flip"]), reread.load(["x.png"]))


def _store_bytes(cache):
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize(("change", "field"), [
    ({"image_size": 48}, "image_size"),
    ({"backbone": "mobilenet_v1_075", "weights": "imagenet"}, "backbone"),
])
def test_a_cache_of_another_set_up_is_refused(tmp_path, backbone, change, field):
    """Keys are image contents only: reusing a cache folder after features.backbone or image_size
    changed would return the old features as if current. It is refused, naming folder and field."""
    import dataclasses

    from captioner.errors import DataError

    images, cache = tmp_path / "images", tmp_path / "cache"
    names = [f"{i:03d}.png" for i in range(4)]
    _write_images(images, names, seed=0)
    extract_features(_dataset(images), names, CFG, cache, progress=False, backbone=backbone)
    before = _store_bytes(cache)
    with pytest.raises(DataError) as info:
        extract_features(_dataset(images), names, dataclasses.replace(CFG, **change), cache, progress=False)
    assert str(cache) in str(info.value) and field in str(info.value)
    assert _store_bytes(cache) == before


def test_a_cache_of_another_preprocessing_is_refused(tmp_path, backbone):
    import json

    from captioner.data.images import PREPROCESSING_VERSION
    from captioner.errors import DataError
    from captioner.features.extract import cache_key

    images = tmp_path / "images"
    names = ["a.png", "b.png"]
    _write_images(images, names, seed=0)
    cache = tmp_path / "cache"
    extract_features(_dataset(images), names, CFG, cache, progress=False, backbone=backbone)
    record = json.loads((cache / "backbone.json").read_text())
    assert record["preprocessing"] == PREPROCESSING_VERSION
    (cache / "backbone.json").write_text(json.dumps({**record, "preprocessing": PREPROCESSING_VERSION - 1}))
    with pytest.raises(DataError, match="preprocessing"):
        extract_features(_dataset(images), names, CFG, cache, progress=False, backbone=backbone)
    # A record from before the version was kept: unknown in a folder of any name, but the default
    # folder's name (the cache key) carries the version, so that one is still read.
    legacy = {k: v for k, v in record.items() if k != "preprocessing"}
    (cache / "backbone.json").write_text(json.dumps(legacy))
    with pytest.raises(DataError, match="not recorded"):
        extract_features(_dataset(images), names, CFG, cache, progress=False, backbone=backbone)
    keyed = tmp_path / cache_key(CFG)
    cache.rename(keyed)
    store = extract_features(_dataset(images), names, CFG, keyed, progress=False, backbone=backbone)
    assert store.extracted == [] and json.loads((keyed / "backbone.json").read_text()) == record
