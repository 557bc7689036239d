import io

import numpy as np
import pytest
from PIL import Image

from captioner.data.images import load_image
from captioner.errors import ImageError

pytestmark = pytest.mark.unit


def encode(img, fmt, **kwargs):
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


RED = Image.new("RGB", (40, 20), (255, 0, 0))


@pytest.mark.parametrize("data", [
    encode(RED, "JPEG"), encode(RED, "PNG"), encode(RED, "WEBP"), encode(RED, "BMP"), encode(RED, "GIF"),
    encode(RED.convert("CMYK"), "JPEG"), encode(RED.convert("P"), "PNG"), encode(RED.convert("RGBA"), "PNG"),
    encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), encode(Image.new("RGB", (2000, 3), (255, 0, 0)), "PNG"),
], ids=["jpeg", "png", "webp", "bmp", "gif", "cmyk", "palette", "alpha", "1x1", "very-wide"])
def test_formats_and_modes_decode_to_rgb(data):
    pixels = load_image(data, 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels[..., 0].mean() > 180 and pixels[..., 1].mean() < 60


def test_sixteen_bit_grey():
    arr = np.full((10, 10), 65535, dtype=np.uint16)
    pixels = load_image(encode(Image.fromarray(arr), "PNG"), 16)
    assert pixels.min() == 255


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(encode(img, "PNG"), 4).min() == 255


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display: the red half goes to the top
    pixels = load_image(encode(img, "JPEG", exif=exif), 20)
    assert pixels[:10, :, 0].mean() > 200 and pixels[10:, :, 0].mean() < 60


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buffer.getvalue(), 8)[..., 0].mean() > 200


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
