"""A corpus of hostile and unusual uploads, with the status the gateway must answer for each.

Shared by the test suite (in-process) and ``benchmarks/bench_gateway.py`` (over HTTP, plus random
fuzz payloads). Valid-but-unusual images must get 200; everything else a 4xx; never a 5xx.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Iterator

from PIL import Image


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _photo(size=(64, 48), seed=0) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", size)
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    return img


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG declaring a huge canvas (the header is all a decompression bomb needs)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\x00" * (width // 8 + 1) * 16, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def valid_cases() -> Iterator[tuple[str, bytes]]:
    photo = _photo()
    yield "jpeg", _save(photo, "JPEG")
    yield "jpeg-progressive", _save(photo, "JPEG", progressive=True)
    yield "jpeg-quality-1", _save(photo, "JPEG", quality=1)
    yield "png", _save(photo, "PNG")
    yield "png-interlaced", _save(photo, "PNG", optimize=True)
    yield "webp", _save(photo, "WEBP")
    yield "webp-lossless", _save(photo, "WEBP", lossless=True)
    yield "bmp", _save(photo, "BMP")
    yield "gif", _save(photo.convert("P"), "GIF")
    yield "tiff", _save(photo, "TIFF")
    yield "cmyk-jpeg", _save(photo.convert("CMYK"), "JPEG")
    yield "grey-jpeg", _save(photo.convert("L"), "JPEG")
    yield "palette-png", _save(photo.convert("P"), "PNG")
    yield "palette-transparent-png", _save(photo.convert("P"), "PNG", transparency=0)
    yield "rgba-png", _save(photo.convert("RGBA"), "PNG")
    yield "la-png", _save(photo.convert("LA"), "PNG")
    yield "1-bit-png", _save(photo.convert("1"), "PNG")
    yield "16-bit-png", _save(Image.new("I;16", (32, 32), 40000), "PNG")
    yield "32-bit-int-tiff", _save(Image.new("I", (16, 16), 70000), "TIFF")
    yield "float-tiff", _save(Image.new("F", (16, 16), 0.5), "TIFF")
    frames = [_photo(seed=i) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], loop=0)
    yield "animated-gif", buffer.getvalue()
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    yield "animated-png", buffer.getvalue()
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        yield f"exif-rotated-{orientation}", _save(photo, "JPEG", exif=exif)
    exif = Image.Exif()
    exif[0x0112] = 99  # nonsense orientation: ignored
    yield "exif-bad-orientation", _save(photo, "JPEG", exif=exif)
    yield "1x1", _save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")
    yield "very-wide", _save(Image.new("RGB", (4000, 2), (200, 10, 10)), "PNG")
    yield "very-tall", _save(Image.new("RGB", (2, 4000), (200, 10, 10)), "PNG")
    yield "large-jpeg", _save(_photo((1600, 1200)).resize((1600, 1200)), "JPEG")
    yield "icc-profile-jpeg", _save(photo, "JPEG", icc_profile=b"\x00" * 128)


def invalid_cases() -> Iterator[tuple[str, bytes, int]]:
    photo = _photo()
    jpeg, png = _save(photo, "JPEG"), _save(photo, "PNG")
    yield "empty", b"", 422
    yield "one-byte", b"\xff", 415
    yield "text", b"hello, this is not an image", 415
    yield "html", b"<html><script>alert(1)</script></html>", 415
    yield "json", b'{"image": "no"}', 415
    yield "pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415
    yield "zip", b"PK\x03\x04" + b"\x00" * 100, 415
    yield "elf", b"\x7fELF" + b"\x00" * 60, 415
    yield "svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 415
    yield "jpeg-header-only", jpeg[:20], 422
    yield "jpeg-truncated-half", jpeg[: len(jpeg) // 2], 422
    yield "png-truncated", png[: len(png) // 2], 422
    yield "png-header-only", png[:33], 422
    corrupted = bytearray(png)
    corrupted[40:60] = b"\x00" * 20
    yield "png-corrupt-data", bytes(corrupted), 422
    yield "gif-header-only", b"GIF89a\x10\x00\x10\x00", 422
    yield "bmp-header-only", b"BM" + b"\x00" * 20, 422
    yield "png-bomb", _png_bomb(30000, 30000), 413
    yield "png-wide-bomb", _png_bomb(1_000_000, 100), 413
    yield "random-bytes", bytes(random.Random(1).randrange(256) for _ in range(2048)), 415


def fuzz_payloads(count: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """Random payloads: noise, and valid images with bytes flipped, cut or spliced."""
    rng = random.Random(seed)
    seeds = [data for _, data in valid_cases()][:12]
    for i in range(count):
        kind = rng.randrange(4)
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 4096)))
        else:
            data = bytearray(rng.choice(seeds))
            if kind == 1:
                for _ in range(rng.randrange(1, 20)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind == 2:
                data = data[: rng.randrange(len(data) + 1)]
            else:
                at = rng.randrange(len(data) + 1)
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            data = bytes(data)
        yield f"fuzz-{i}", data
