"""The one image preprocessing function, shared by feature extraction, the library and the gateway.

Decode (JPEG, PNG, WebP, GIF first frame, BMP, ...) -> apply EXIF orientation -> RGB (CMYK,
palette, 16-bit, alpha composited on white) -> resize to the backbone's square input. The
training images (Flickr8k here) were squashed to a square without keeping the aspect ratio, so
serving squashes too: the model sees what it was trained on.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.errors import ImageError, ImageTooLarge, ImageUnsupported

DEFAULT_MAX_PIXELS = 50_000_000


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float grey: scale the used range into 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0) if mode != "F" else (255.0 / hi if hi > 0 else 1.0)
        arr = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _has_image_signature(data: bytes) -> bool:
    """Starts like an image format Pillow reads (so a failure is damage, not the wrong type)."""
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def load_image(source: bytes | str | Path, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               label: str | None = None) -> np.ndarray:
    """Decode ``source`` (bytes or a path) into a ``(size, size, 3)`` uint8 RGB array.

    Raises ImageError naming ``label`` (or the path) for undecodable, empty or oversized images.
    """
    where = label or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read image: {exc.strerror or exc}", path=where) from exc
    if not data:
        raise ImageError("empty image file", path=where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageError(f"image has no pixels ({width}x{height})", path=where)
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
                    path=where,
                )
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            img = _to_rgb(img)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        if _has_image_signature(data):
            raise ImageError("corrupt or truncated image (its header is cut or damaged)", path=where) from exc
        raise ImageUnsupported("not a decodable image: not in a format Pillow reads (JPEG, PNG, WebP, GIF, "
                               "BMP, TIFF, ...)", path=where) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}", path=where) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}", path=where) from exc



def decode_image_tf(data, size: int):
    """In-graph decode of one encoded image (a scalar string tensor) to ``[size, size, 3]`` uint8."""
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
