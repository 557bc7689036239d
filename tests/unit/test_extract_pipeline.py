"""Extraction's input pipeline (issue #11): a plain JPEG is decoded once, features are cast to
float16 in the backbone's graph, shards are streamed to disk; the pixels, features and cache files
stay what they were."""

import io

import numpy as np
import pytest
from PIL import Image

from captioner.config import FeaturesConfig
from captioner.data import images as image_module
from captioner.data.images import load_image
from captioner.data.readers import CaptionDataset
from captioner.errors import ImageError
from captioner.features.backbones import build_backbone
from captioner.features.extract import FeatureStore, ShardFile, backbone_fn, decode_file, extract_features

from .test_images import pillow_reference

pytestmark = pytest.mark.unit
RNG = np.random.default_rng(11)


def _photo(size=(24, 24)) -> Image.Image:
    # Smooth gradients plus noise: JPEG's subsampling and IDCT rounding both show up.
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 9, y * 7, (x + y) * 4], axis=-1) % 256
    noise = RNG.integers(-20, 21, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def _variants() -> dict[str, bytes]:
    img = _photo()
    exif = Image.Exif()
    exif[0x0112] = 6
    png = io.BytesIO()
    img.save(png, format="PNG")
    return {
        "baseline-420.jpg": _jpeg(img, quality=85),
        "baseline-444.jpg": _jpeg(img, quality=95, subsampling=0),
        "baseline-422.jpg": _jpeg(img, quality=75, subsampling=1),
        "progressive.jpg": _jpeg(img, quality=90, progressive=True),
        "optimized.jpg": _jpeg(img, quality=60, optimize=True),
        "exif-6.jpg": _jpeg(img, quality=90, exif=exif),
        "grey.jpg": _jpeg(img.convert("L"), quality=90),
        "cmyk.jpg": _jpeg(img.convert("CMYK"), quality=90),
        "other-size.jpg": _jpeg(_photo((37, 29)), quality=90),
        "image.png": png.getvalue(),
    }


def test_decode_file_gives_the_preprocessings_pixels_and_load_images_errors(tmp_path):
    for name, data in _variants().items():
        path = tmp_path / name
        path.write_bytes(data)
        np.testing.assert_array_equal(decode_file(path, 24), pillow_reference(data, 24), err_msg=name)
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(_jpeg(_photo(), quality=90)[:300])
    with pytest.raises(ImageError) as expected:
        load_image(bad, 24)
    with pytest.raises(ImageError) as got:
        decode_file(bad, 24)
    assert str(got.value) == str(expected.value) and str(bad) in str(got.value)
    with pytest.raises(ImageError, match="not found|cannot read"):
        decode_file(tmp_path / "absent.jpg", 24)


def test_plain_jpegs_are_decoded_once_and_give_the_same_features(tmp_path):
    """Extraction of square RGB JPEGs of the backbone's size never runs the TensorFlow decoder
    (the second decode ``load_image`` does after Pillow's); the features are those of the backbone
    on the preprocessing's pixels (``pillow_reference``, which ``load_image`` gives to the bit: the
    test above and test_images), flipped copies included."""
    size = 56  # a size no other test decodes at: its TensorFlow decoder is traced only if used here
    cfg = FeaturesConfig(backbone="patches", weights="none", image_size=size, batch_size=4, shard_size=6)
    folder = tmp_path / "images"
    folder.mkdir()
    names = [f"{i}.jpg" for i in range(11)]
    for number, name in enumerate(names):
        (folder / name).write_bytes(_jpeg(_photo((size, size)), quality=70 + 2 * number,
                                          subsampling=number % 3, progressive=number % 2 == 1))
    backbone = build_backbone(cfg.backbone, cfg.weights, size)
    store = extract_features(CaptionDataset("t", folder, {}, {}), names, cfg, tmp_path / "cache", flip=names[:3],
                             progress=False, backbone=backbone)
    assert size not in image_module._DECODERS  # the cache of traced TensorFlow decoders, one per size

    # Not load_image: tracing its decoder for this size would cost seconds of the suite's time.
    pixels = np.stack([pillow_reference((folder / name).read_bytes(), size) for name in names])
    pixels = np.concatenate([pixels, pixels[:3, :, ::-1]])
    expected = backbone(pixels.astype(np.float32)).numpy().astype(np.float16)
    got = store.load([*names, *(name + "#flip" for name in names[:3])])
    assert got.tobytes() == expected.tobytes()
    # Whole batches per shard (4 + 4 >= 6), the rest in the last one: 14 rows as 8 + 6.
    reread = FeatureStore(tmp_path / "cache")
    assert sorted({shard for shard, _ in reread.index.values()}) == [0, 1]
    assert [len(np.load(tmp_path / "cache" / f"shard-{n:05d}.npy")) for n in (0, 1)] == [8, 6]


def test_backbone_fn_returns_float16_rounded_as_numpy_does():
    backbone = build_backbone("patches", "none", 32)
    pixels = RNG.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    got = backbone_fn(backbone, 8)(pixels)
    want = backbone(pixels.astype(np.float32)).numpy().astype(np.float16)
    assert got.dtype == np.float16 and got.tobytes() == want.tobytes()


def test_a_streamed_shard_is_np_save_byte_for_byte_and_whole_or_absent(tmp_path):
    rows = RNG.standard_normal((10, 3, 5)).astype(np.float16)
    with ShardFile(tmp_path / "shard-00000.npy", 0, 10, (3, 5)) as shard:
        for start in range(0, 10, 4):
            shard.write(rows[start:start + 4])
    buffer = io.BytesIO()
    np.save(buffer, rows)
    assert (tmp_path / "shard-00000.npy").read_bytes() == buffer.getvalue()

    short = ShardFile(tmp_path / "shard-00001.npy", 1, 10, (3, 5))
    short.write(rows[:4])
    with pytest.raises(ValueError, match="4 of its 10 rows"):
        short.finish()
    wrong_shape = ShardFile(tmp_path / "shard-00002.npy", 2, 10, (3, 5))
    with pytest.raises(ValueError, match="holds 10 rows"), wrong_shape as bad:
        bad.write(rows[:, :2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.npy"]
