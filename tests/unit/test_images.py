import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from captioner.data.images import _tf_decoder, load_image
from captioner.errors import ImageError

pytestmark = pytest.mark.unit


def encode(img, fmt, **kwargs):
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pillow_reference(data: bytes, size: int) -> np.ndarray:
    """The preprocessing as Pillow does it (what the features were first computed with): the spec
    that both ``load_image`` and the in-graph ``decode_image_tf`` must reproduce."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):  # wide grey: its range into 8 bits
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            arr = arr * (255.0 / arr.max() if arr.max() > 0 else 1.0)
        else:
            arr = arr * (255.0 / (65535.0 if arr.max() > 255 else 255.0))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img)


def graph_decode(data: bytes, size: int) -> np.ndarray:
    """``decode_image_tf`` alone, traced into a graph as serving_default runs it (no Pillow, no
    fallback). It is the traced function ``load_image`` keeps: tracing costs seconds per size."""
    import tensorflow as tf

    return _tf_decoder(size)(tf.constant(data)).numpy()


def assert_same_everywhere(data: bytes, size: int) -> np.ndarray:
    expected = pillow_reference(data, size)
    np.testing.assert_array_equal(graph_decode(data, size), expected)
    np.testing.assert_array_equal(load_image(data, size), expected)
    return expected


RNG = np.random.default_rng(0)
NOISE = Image.fromarray(RNG.integers(0, 256, (30, 41, 3), dtype=np.uint8))  # odd, non-square: shows any turn


def exif_blob(orientation: int, little: bool, tag_type: int = 3) -> bytes:
    """A TIFF header with IFD0 holding one Orientation entry, in either byte order."""
    e = "<" if little else ">"
    value = struct.pack(e + "H", orientation) + b"\0\0" if tag_type == 3 else struct.pack(e + "I", orientation)
    entry = struct.pack(e + "HHI", 0x0112, tag_type, 1) + value
    return b"Exif\0\0" + (b"II*\0" if little else b"MM\0*") + struct.pack(e + "I", 8) + struct.pack(e + "H", 1) \
        + entry + struct.pack(e + "I", 0)


def png_16bit(arr: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes 16-bit grey only)."""
    height, width = arr.shape[:2]
    rows = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("little", [True, False], ids=["II", "MM"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_in_both_byte_orders(orientation, little, fmt):
    data = encode(NOISE, fmt, exif=exif_blob(orientation, little))
    upright = assert_same_everywhere(data, 24)
    if orientation != 1:  # the tag did change the pixels
        assert not np.array_equal(upright, pillow_reference(encode(NOISE, fmt), 24))


@pytest.mark.parametrize("blob", [
    exif_blob(6, True, tag_type=4), exif_blob(6, False, tag_type=1), exif_blob(99, True),
    exif_blob(6, True)[:14], b"Exif\0\0II*\0\xff\xff\xff\x7f",
], ids=["long", "byte-type-ignored", "nonsense-value", "cut-ifd", "ifd-offset-out-of-range"])
def test_unusual_or_damaged_exif(blob):
    assert_same_everywhere(encode(NOISE, "JPEG", exif=blob), 24)


PALETTE = NOISE.convert("P")
LA = Image.merge("LA", [NOISE.convert("L"), Image.fromarray(RNG.integers(0, 256, (30, 41), dtype=np.uint8))])
GREY16 = RNG.integers(0, 65536, (30, 41), dtype=np.uint16)


@pytest.mark.parametrize("data", [
    encode(PALETTE, "PNG", transparency=5),
    encode(PALETTE, "PNG", transparency=bytes(RNG.integers(0, 256, 256, dtype=np.uint8))),
    encode(PALETTE, "GIF", transparency=5),
    encode(NOISE.convert("L"), "GIF", transparency=3),
    encode(LA, "PNG"),
    encode(NOISE.convert("RGBA"), "PNG"),
    encode(Image.fromarray(GREY16), "PNG"),
    encode(Image.fromarray(GREY16 % 200), "PNG"),
    png_16bit(RNG.integers(0, 65536, (30, 41, 3), dtype=np.uint16), 2),
    png_16bit(RNG.integers(0, 65536, (30, 41, 4), dtype=np.uint16), 6),
    png_16bit(RNG.integers(0, 65536, (30, 41, 2), dtype=np.uint16), 4),
    encode(NOISE.convert("1"), "PNG"),
    encode(NOISE.convert("CMYK"), "JPEG"),
    encode(NOISE.convert("L"), "JPEG"),
    encode(NOISE, "JPEG", progressive=True),
    encode(PALETTE, "BMP"),
    encode(NOISE, "BMP"),
    encode(NOISE.convert("RGBA"), "BMP"),
], ids=["palette-trns", "palette-alpha-table", "gif-trns", "grey-gif-trns", "LA", "RGBA", "grey16",
        "grey16-low-range", "rgb16", "rgba16", "la16", "1-bit", "cmyk-jpeg", "grey-jpeg", "progressive",
        "bmp-palette", "bmp24", "bmp32"])
def test_graph_library_and_pillow_agree_on_hard_modes(data):
    assert_same_everywhere(data, 24)


SQUARE = Image.fromarray(RNG.integers(0, 256, (24, 24, 3), dtype=np.uint8))
_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.mark.parametrize("options", [
    {"quality": 50}, {"quality": 95, "subsampling": 0}, {"quality": 80, "subsampling": 1},
    {"progressive": True}, {"optimize": True}, {"icc_profile": _ICC},
], ids=["q50-420", "q95-444", "q80-422", "progressive", "optimized", "icc"])
def test_a_model_size_rgb_jpeg_is_decoded_once_to_the_graphs_pixels(options, monkeypatch):
    """The gateway's usual upload and every Flickr8k file: Pillow's decode is returned as it is, and
    it equals what serving_default's graph computes from the same bytes."""
    from captioner.data import images

    data = encode(SQUARE, "JPEG", **options)
    expected = pillow_reference(data, 24)
    np.testing.assert_array_equal(graph_decode(data, 24), expected)
    monkeypatch.setattr(images, "_decode", lambda *args: pytest.fail("decoded a second time"))
    pixels = load_image(data, 24)
    np.testing.assert_array_equal(pixels, expected)
    assert pixels.flags.writeable  # like every other path's result: a caller may edit it in place


@pytest.mark.parametrize("data", [
    encode(SQUARE, "JPEG", exif=exif_blob(6, True)),   # turned: the graph applies the tag
    encode(SQUARE.convert("L"), "JPEG"),                  # grey: the graph makes it RGB
    encode(SQUARE.convert("CMYK"), "JPEG"),
    encode(SQUARE, "PNG"),
], ids=["exif-turned", "grey", "cmyk", "png"])
def test_other_model_size_images_still_take_the_graphs_decoder(data, monkeypatch):
    from captioner.data import images

    calls = []
    decode = images._decode
    monkeypatch.setattr(images, "_decode", lambda *args: calls.append(1) or decode(*args))
    assert_same_everywhere(data, 24)
    assert calls == [1]


def test_transparency_is_white_in_the_graph():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, 3:] = (200, 10, 10, 255)
    pixels = assert_same_everywhere(encode(Image.fromarray(rgba).resize((24, 16)), "PNG"), 24)
    assert (pixels[:, 0] == 255).all() and (pixels[:, -1] == (200, 10, 10)).all()


@pytest.mark.parametrize("shape", [(187, 301), (5, 7), (1, 1), (2, 400), (64, 20)])
def test_resize_is_pillows_bilinear_to_the_bit(shape):
    img = Image.fromarray(RNG.integers(0, 256, (*shape, 3), dtype=np.uint8))
    assert_same_everywhere(encode(img, "PNG"), 24)


@pytest.mark.parametrize("data", [encode(NOISE, "WEBP", lossless=True), encode(NOISE.convert("CMYK"), "TIFF"),
                                  encode(Image.new("F", (9, 7), 0.5), "TIFF"), encode(NOISE.convert("1"), "BMP"),
                                  encode(NOISE, "WEBP", lossless=True, exif=exif_blob(6, False))],
                         ids=["webp", "cmyk-tiff", "float-tiff", "1-bit-bmp", "webp-exif-6"])
def test_formats_the_graph_cannot_read_go_through_png_in_the_library(data):
    import tensorflow as tf

    np.testing.assert_array_equal(load_image(data, 24), pillow_reference(data, 24))
    with pytest.raises(tf.errors.InvalidArgumentError):
        graph_decode(data, 24)


def test_graph_names_what_it_cannot_decode():
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, GIF or BMP"):
        graph_decode(b"hello, this is not an image", 24)


RED = Image.new("RGB", (40, 20), (255, 0, 0))


@pytest.mark.parametrize("data", [
    encode(RED, "JPEG"), encode(RED, "PNG"), encode(RED, "WEBP"), encode(RED, "BMP"), encode(RED, "GIF"),
    encode(RED.convert("CMYK"), "JPEG"), encode(RED.convert("P"), "PNG"), encode(RED.convert("RGBA"), "PNG"),
    encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), encode(Image.new("RGB", (2000, 3), (255, 0, 0)), "PNG"),
], ids=["jpeg", "png", "webp", "bmp", "gif", "cmyk", "palette", "alpha", "1x1", "very-wide"])
def test_formats_and_modes_decode_to_rgb(data):
    pixels = load_image(data, 24)
    assert pixels.shape == (24, 24, 3) and pixels.dtype == np.uint8
    assert pixels[..., 0].mean() > 180 and pixels[..., 1].mean() < 60


def test_sixteen_bit_grey():
    arr = np.full((10, 10), 65535, dtype=np.uint16)
    pixels = load_image(encode(Image.fromarray(arr), "PNG"), 24)
    assert pixels.min() == 255


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(encode(img, "PNG"), 24).min() == 255


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display: the red half goes to the top
    pixels = load_image(encode(img, "JPEG", exif=exif), 24)
    assert pixels[:11, :, 0].mean() > 200 and pixels[13:, :, 0].mean() < 60


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buffer.getvalue(), 24)[..., 0].mean() > 200


@pytest.mark.parametrize("data, words", [
    (b"", "empty image"),
    (b"not an image at all", "not a decodable image"),
    (encode(RED, "JPEG")[:100], "corrupt or truncated"),
])
def test_bad_bytes_raise_image_error(data, words):
    with pytest.raises(ImageError, match=words):
        load_image(data, 16, label="upload.jpg")


def test_pixel_limit_stops_bombs():
    big = encode(Image.new("L", (5000, 5000)), "PNG")
    with pytest.raises(ImageError, match="over the limit"):
        load_image(big, 16, max_pixels=1_000_000)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg", 16)


def test_feature_cache_key_names_the_preprocessing_version():
    """Features cached from other pixels are never mixed with new ones."""
    from captioner.config import load_config
    from captioner.data.images import PREPROCESSING_VERSION
    from captioner.features.extract import cache_key

    assert cache_key(load_config("smoke").features).endswith(f"-pre{PREPROCESSING_VERSION}")
