"""The one image preprocessing function, shared by feature extraction, the library, the gateway and
the exported SavedModel's ``serving_default``.

Decode (JPEG, PNG, GIF first frame, BMP) -> apply EXIF orientation -> RGB (CMYK, palette, grey,
16-bit, alpha composited on white) -> resize to the backbone's square input. All of it is written
once, in stock TensorFlow ops (``decode_image_tf``), so that TensorFlow Serving runs the very same
computation as the library: no ``py_function``, no custom ops. The training images (Flickr8k here)
were squashed to a square without keeping the aspect ratio, so serving squashes too.

The pixels reproduce the Pillow pipeline the features were first computed with, bit for bit:
``ImageOps.exif_transpose``, ``Image.alpha_composite`` on white and ``Image.resize(BILINEAR)``
(Pillow's fixed-point two-pass filter) are re-implemented with integer arithmetic, and JPEGs are
decoded with libjpeg-turbo's accurate integer IDCT as Pillow does. The tests check this against
Pillow itself, so a Pillow upgrade that changes its arithmetic shows up there.

``load_image`` keeps Pillow as the gatekeeper (format detection, pixel limit, decompression bombs,
clear errors for damaged files) and hands the bytes to the TensorFlow function; formats that
TensorFlow cannot decode (WebP, TIFF, 1- 4- 16-bit or compressed BMPs, ...) are first re-encoded
losslessly as PNG, their EXIF orientation carried along in an ``eXIf`` chunk. One case skips the
TensorFlow function: an RGB JPEG of exactly the input size without EXIF, where the function would do
nothing but the decode Pillow has just done (``_needs_nothing_more``; the tests pin the two equal).
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from captioner.errors import ImageError, ImageTooLarge, ImageUnsupported

DEFAULT_MAX_PIXELS = 50_000_000
# Part of the feature cache key: bump it whenever the pixels this module produces change.
PREPROCESSING_VERSION = 2

_JPEG, _PNG, _GIF87, _GIF89, _BMP = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM"
_SIGNATURES = (_JPEG, _PNG, _GIF87, _GIF89, _BMP, b"II*\x00", b"MM\x00*")
_EXIF_ORIENTATION = 0x0112
_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 - 2


# --------------------------------------------------------------------------------------------
# The in-graph definition
# --------------------------------------------------------------------------------------------

class _Bytes:
    """Random access to the bytes of an encoded image, safe past the end (reads 0 there)."""

    def __init__(self, data):
        import tensorflow as tf

        raw = tf.io.decode_raw(data, tf.uint8)
        self.n = tf.size(raw, out_type=tf.int64)
        # Padding keeps every clamped read defined, even for an empty string.
        self.buf = tf.concat([raw, tf.zeros([16], tf.uint8)], 0)

    def at(self, index):
        import tensorflow as tf

        index = tf.convert_to_tensor(index, tf.int64)
        value = tf.cast(tf.gather(self.buf, tf.clip_by_value(index, 0, self.n + 15)), tf.int64)
        return tf.where((index >= 0) & (index < self.n), value, tf.zeros_like(value))

    def u16(self, pos, little):
        import tensorflow as tf

        a, b = self.at(pos), self.at(pos + 1)
        return tf.where(little, a + b * 256, a * 256 + b)

    def u32(self, pos, little):
        import tensorflow as tf

        lo, hi = self.u16(pos, little), self.u16(pos + 2, little)
        return tf.where(little, lo + hi * 65536, lo * 65536 + hi)

    def equals(self, pos, text: bytes):
        import tensorflow as tf

        expected = tf.constant(list(text), tf.int64)
        return tf.reduce_all(self.at(pos + tf.range(len(text), dtype=tf.int64)) == expected)


def _contains(data, text: bytes):
    """Whether ``text`` occurs in ``data``: one cheap scan that spares the parsers most files."""
    import tensorflow as tf

    return tf.size(tf.strings.split(data, sep=text.decode("ascii"), maxsplit=1)) > 1


def _tiff_orientation(b: _Bytes, start, end):
    """The Orientation tag of IFD0 of the TIFF structure in ``[start, end)``; 1 when absent or damaged.

    As Pillow reads it: either byte order, the last Orientation entry wins, and only a single
    SHORT/LONG/SSHORT/SLONG value counts (Pillow leaves other encodings untransposed).
    """
    import tensorflow as tf

    little = b.equals(start, b"II")
    order_ok = little | b.equals(start, b"MM")
    magic_ok = b.u16(start + 2, little) == 42
    ifd = start + b.u32(start + 4, little)
    room = tf.maximum((end - ifd - 2) // 12, 0)
    count = tf.minimum(b.u16(ifd, little), room)
    count = tf.where(order_ok & magic_ok & (ifd >= start), count, tf.zeros_like(count))
    entries = ifd + 2 + 12 * tf.range(count, dtype=tf.int64)
    tags, types = b.u16(entries, little), b.u16(entries + 2, little)
    counts = b.u32(entries + 4, little)
    values = tf.where((types == 3) | (types == 8), b.u16(entries + 8, little), b.u32(entries + 8, little))
    match = (tags == _EXIF_ORIENTATION) & (counts == 1) & ((types == 3) | (types == 4) | (types == 8) | (types == 9))
    last = tf.reduce_max(tf.where(match, tf.range(count, dtype=tf.int64), -tf.ones_like(tags)))
    # One 1 after the values: "no match" picks it (reduce_max of nothing is the int64 minimum).
    return tf.gather(tf.concat([values, tf.ones([1], tf.int64)], 0), tf.where(last >= 0, last, count))


def _jpeg_orientation(data):
    """EXIF orientation of a JPEG: the first APP1 segment that starts with ``Exif\\0\\0``."""
    import tensorflow as tf

    return tf.cond(_contains(data, b"Exif\0\0"), lambda: _jpeg_exif_orientation(_Bytes(data)),
                   lambda: tf.constant(1, tf.int64))


def _jpeg_exif_orientation(b: _Bytes):
    import tensorflow as tf

    def cond(pos, start, end, done):
        return tf.logical_not(done)

    def body(pos, start, end, done):
        marker = b.at(pos + 1)
        fill = marker == 0xFF
        standalone = (marker == 0x01) | ((marker >= 0xD0) & (marker <= 0xD8))
        length = b.u16(pos + 2, False)
        stop = (b.at(pos) != 0xFF) | (pos + 4 > b.n) | (marker == 0xDA) | (marker == 0xD9)
        stop |= ~fill & ~standalone & (length < 2)
        found = ~stop & ~fill & ~standalone & (marker == 0xE1) & b.equals(pos + 4, b"Exif\0\0")
        step = tf.where(fill, tf.constant(1, tf.int64), tf.where(standalone, tf.constant(2, tf.int64), 2 + length))
        return (pos + step, tf.where(found, pos + 10, start), tf.where(found, tf.minimum(pos + 2 + length, b.n), end),
                stop | found)

    zero = tf.constant(0, tf.int64)
    _, start, end, _ = tf.while_loop(cond, body, (tf.constant(2, tf.int64), zero - 1, zero, tf.constant(False)),
                                     maximum_iterations=4096)
    return tf.cond(start >= 0, lambda: _tiff_orientation(b, start, end), lambda: tf.constant(1, tf.int64))


def _png_orientation(data):
    """EXIF orientation of a PNG: its ``eXIf`` chunk (the PNG spec puts it before the image data)."""
    import tensorflow as tf

    return tf.cond(_contains(data, b"eXIf"), lambda: _png_exif_orientation(_Bytes(data)),
                   lambda: tf.constant(1, tf.int64))


def _png_exif_orientation(b: _Bytes):
    import tensorflow as tf

    def cond(pos, start, end, done):
        return tf.logical_not(done)

    def body(pos, start, end, done):
        length = b.u32(pos, False)
        stop = (pos + 8 > b.n) | b.equals(pos + 4, b"IDAT") | b.equals(pos + 4, b"IEND")
        found = ~stop & b.equals(pos + 4, b"eXIf")
        return (pos + 12 + length, tf.where(found, pos + 8, start),
                tf.where(found, tf.minimum(pos + 8 + length, b.n), end), stop | found)

    zero = tf.constant(0, tf.int64)
    _, start, end, _ = tf.while_loop(cond, body, (tf.constant(8, tf.int64), zero - 1, zero, tf.constant(False)),
                                     maximum_iterations=4096)
    return tf.cond(start >= 0, lambda: _tiff_orientation(b, start, end), lambda: tf.constant(1, tf.int64))


def _orient(image, orientation):
    """``ImageOps.exif_transpose``: orientation 2-8 says how to turn the stored pixels upright."""
    import tensorflow as tf

    def transpose(x):
        return tf.transpose(x, [1, 0, 2])

    branches = {
        2: lambda: tf.reverse(image, [1]),                      # FLIP_LEFT_RIGHT
        3: lambda: tf.reverse(image, [0, 1]),                   # ROTATE_180
        4: lambda: tf.reverse(image, [0]),                      # FLIP_TOP_BOTTOM
        5: lambda: transpose(image),                            # TRANSPOSE
        6: lambda: tf.image.rot90(image, k=3),                  # ROTATE_270 (clockwise)
        7: lambda: tf.reverse(transpose(image), [0, 1]),        # TRANSVERSE
        8: lambda: tf.image.rot90(image, k=1),                  # ROTATE_90 (counter-clockwise)
    }
    index = tf.cast(tf.where((orientation >= 2) & (orientation <= 8), orientation - 1, 0), tf.int32)
    return tf.switch_case(index, [lambda: tf.identity(image)] + [branches[k] for k in range(2, 9)])


def _composite_on_white(rgba):
    """``Image.alpha_composite`` of RGBA over opaque white, with Pillow's integer rounding."""
    import tensorflow as tf

    x = tf.cast(rgba, tf.int32)
    rgb, alpha = x[..., :3], x[..., 3:]
    shift = tf.bitwise.right_shift
    tmp = rgb * alpha * 128 + 255 * (255 - alpha) * 128 + (0x80 << 7)
    return tf.cast(shift(shift(shift(tmp, 8) + tmp, 8), 7), tf.uint8)


def _patch_byte_string(data, pos, values):
    """``data`` with the bytes at ``pos`` replaced by ``values`` (int64 vector, same length kept)."""
    import tensorflow as tf

    table = tf.constant([bytes([i]) for i in range(256)])
    patch = tf.strings.reduce_join(tf.gather(table, values))
    n = tf.shape(values, out_type=tf.int64)[0]
    zero, rest = tf.constant(0, tf.int64), tf.constant(-1, tf.int64)
    return tf.strings.join([tf.strings.substr(data, zero, pos), patch, tf.strings.substr(data, pos + n, rest)])


def _gif_first_frame(data, b: _Bytes):
    """First frame of a GIF, its transparent colour shown as white.

    ``tf.io.decode_gif`` paints a transparent first frame black, so the transparent palette entry
    is rewritten to white and the transparency flag cleared before decoding: compositing a binary
    alpha on white gives exactly that.
    """
    import tensorflow as tf

    packed = b.at(10)
    global_table = tf.where(packed >= 128, tf.constant(13, tf.int64), tf.constant(-1, tf.int64))
    global_entries = tf.bitwise.left_shift(tf.constant(2, tf.int64), packed % 8)
    start = tf.where(packed >= 128, 13 + 3 * global_entries, tf.constant(13, tf.int64))

    def cond(pos, in_blocks, gce, image, done):
        return tf.logical_not(done)

    def body(pos, in_blocks, gce, image, done):
        size = b.at(pos)
        past_end = pos >= b.n
        # Inside an extension: a chain of sub-blocks, ended by a zero-length one.
        block_pos = tf.where(size == 0, pos + 1, pos + 1 + size)
        block_next = tf.where(size == 0, tf.constant(False), tf.constant(True))
        is_extension = size == 0x21
        is_gce = is_extension & (b.at(pos + 1) == 0xF9) & (b.at(pos + 2) == 4)
        is_image = size == 0x2C
        top_pos = pos + 2
        new_pos = tf.where(in_blocks, block_pos, top_pos)
        new_in_blocks = tf.where(in_blocks, block_next, is_extension)
        new_gce = tf.where(~in_blocks & is_gce, pos, gce)
        new_image = tf.where(~in_blocks & is_image, pos, image)
        new_done = past_end | (~in_blocks & ~is_extension)
        return new_pos, new_in_blocks, new_gce, new_image, new_done

    minus = tf.constant(-1, tf.int64)
    _, _, gce, image, _ = tf.while_loop(cond, body, (start, tf.constant(False), minus, minus, tf.constant(False)),
                                        maximum_iterations=65536)
    image_packed = b.at(image + 9)
    local = image_packed >= 128
    table = tf.where(local, image + 10, global_table)
    entries = tf.where(local, tf.bitwise.left_shift(tf.constant(2, tf.int64), image_packed % 8), global_entries)
    flags = b.at(gce + 3)
    index = b.at(gce + 6)
    transparent = (image >= 0) & (gce >= 0) & (flags % 2 == 1) & (table >= 0) & (index < entries)
    transparent &= table + 3 * index + 3 <= b.n

    def whiten():
        patched = _patch_byte_string(data, table + 3 * index, tf.constant([255, 255, 255], tf.int64))
        return _patch_byte_string(patched, gce + 3, tf.reshape(flags - 1, [1]))

    data = tf.cond(transparent, whiten, lambda: tf.identity(data))
    return tf.io.decode_gif(data)[0]


def _png_pixels(data, b: _Bytes):
    """RGB of a PNG as Pillow reads it: palette and grey+alpha and RGBA composited on white, a
    16-bit colour PNG by its high byte, a 16-bit grey one scaled into 8 bits (as ``_grey_to_8bit``)."""
    import tensorflow as tf

    depth, colour = b.at(24), b.at(25)

    def grey16():
        grey = tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint16), tf.float64)
        scale = tf.where(tf.reduce_max(grey) > 255.0, tf.constant(255.0 / 65535.0, tf.float64),
                         tf.constant(1.0, tf.float64))
        grey = tf.cast(tf.clip_by_value(grey * scale, 0.0, 255.0), tf.uint8)
        return tf.image.grayscale_to_rgb(grey)

    def with_alpha():
        return _composite_on_white(tf.io.decode_png(data, channels=4))

    def opaque():
        # Pillow ignores a tRNS colour key on grey and RGB images: so does this.
        return tf.io.decode_png(data, channels=3)

    return tf.case([(tf.equal(depth, 16) & tf.equal(colour, 0), grey16),
                    ((colour == 3) | (colour == 4) | (colour == 6), with_alpha)], default=opaque)


def _bmp_pixels(data, b: _Bytes):
    """RGB of an uncompressed 8-, 24- or 32-bit BMP (8-bit through its palette, as Pillow does)."""
    import tensorflow as tf

    header = b.u32(14, True)
    bits, compression = b.u16(28, True), b.u32(30, True)
    supported = tf.equal(compression, 0) & ((bits == 8) | (bits == 24) | (bits == 32)) & (header >= 40)
    check = tf.debugging.Assert(supported, ["serving_default reads uncompressed 8-, 24- and 32-bit BMPs only; "
                                            "bits per pixel, compression:", bits, compression])

    def palette():
        used = b.u32(46, True)
        entries = tf.where((used > 0) & (used <= 256), used, tf.constant(256, tf.int64))
        offsets = 14 + header + 4 * tf.range(entries, dtype=tf.int64)
        colours = tf.stack([b.at(offsets + 2), b.at(offsets + 1), b.at(offsets)], axis=1)  # stored as BGRx
        # channels=0 keeps the stored channel count: one byte per pixel, the palette index.
        indices = tf.minimum(tf.cast(tf.io.decode_bmp(data, channels=0)[..., 0], tf.int64), entries - 1)
        return tf.cast(tf.gather(colours, indices), tf.uint8)

    with tf.control_dependencies([check]):
        return tf.cond(tf.equal(bits, 8), palette, lambda: tf.io.decode_bmp(data, channels=3))


def _resample_coefficients(in_size, out_size):
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for the bilinear filter.

    Returns the first input index of each output pixel ``[out]`` and its fixed-point weights
    ``[out, k]`` (zero past the filter's extent). Computed in float64 in Pillow's order of
    operations, so that the integer weights are Pillow's to the last bit.
    """
    import tensorflow as tf

    f64 = tf.float64
    in_f, out_f = tf.cast(in_size, f64), tf.cast(out_size, f64)
    scale = in_f / out_f
    filterscale = tf.maximum(scale, 1.0)
    support = filterscale  # the bilinear filter's support is 1
    ksize = tf.cast(tf.math.ceil(support), tf.int64) * 2 + 1
    center = (tf.cast(tf.range(out_size), f64) + 0.5) * scale
    ss = 1.0 / filterscale
    # C casts truncate towards zero; both bounds are then clamped to the image.
    xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int64), 0)
    xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int64), tf.cast(in_size, tf.int64)) - xmin
    taps = tf.range(ksize)
    x = tf.cast(taps[None, :] + xmin[:, None], f64)
    weights = tf.maximum(1.0 - tf.abs((x - center[:, None] + 0.5) * ss), 0.0)
    weights = tf.where(taps[None, :] < xmax[:, None], weights, tf.zeros_like(weights))

    # The sum must run left to right, as in C: another order can change the last bit. A scan
    # accumulates in order (the tests compare the weights' effect with Pillow's to the bit).
    total = tf.math.cumsum(weights, axis=1)[:, -1]
    weights = tf.where(total[:, None] != 0.0, weights / total[:, None], weights)
    fixed = tf.cast(0.5 + weights * float(1 << _PRECISION_BITS), tf.int32)  # all weights are >= 0
    return xmin, fixed


def _resample_rows(image, out_size: int):
    """One pass of Pillow's 8-bit resampling along the first axis of ``[N, M, C]`` uint8."""
    import tensorflow as tf

    in_size = tf.shape(image, out_type=tf.int64)[0]
    xmin, fixed = _resample_coefficients(in_size, out_size)
    ksize = tf.shape(fixed, out_type=tf.int64)[1]

    half = tf.constant(1 << (_PRECISION_BITS - 1), tf.int32)
    sources = tf.minimum(xmin[:, None] + tf.range(ksize)[None, :], in_size - 1)  # [out, k]

    def all_taps():
        rows = tf.cast(tf.gather(image, sources), tf.int32)  # [out, k, M, C]
        return half + tf.reduce_sum(rows * fixed[:, :, None, None], axis=1)

    # A big downscale would need a huge [out, k, M, C] buffer: one tap at a time keeps memory at
    # one output-sized buffer instead (whole rows are gathered: the caller turns the image around).
    def tap(i, acc):
        rows = tf.cast(tf.gather(image, sources[:, i]), tf.int32)
        return i + 1, acc + rows * fixed[:, i][:, None, None]

    def tap_by_tap():
        start = tf.fill(tf.concat([[out_size], tf.shape(image)[1:]], 0), half)
        return tf.while_loop(lambda i, acc: i < ksize, tap, (tf.constant(0, tf.int64), start))[1]

    work = out_size * ksize * tf.reduce_prod(tf.shape(image, out_type=tf.int64)[1:])
    acc = tf.cond(work <= 1 << 23, all_taps, tap_by_tap)
    return tf.cast(tf.clip_by_value(tf.bitwise.right_shift(acc, _PRECISION_BITS), 0, 255), tf.uint8)


def _resize_like_pillow(image, size: int):
    """``Image.resize((size, size), BILINEAR)``: two passes, each rounded to 8 bits.

    The order of the passes changes the rounding. Pillow (13, ``ImagingResampleInner``) runs the
    vertical pass first when the height shrinks by more than twice as many pixels as the width.
    A pass over an axis that keeps its size is the identity (one tap of weight 1), so it is run
    rather than skipped: one graph for every case traces faster.
    """
    import tensorflow as tf

    def turn(x):
        return tf.transpose(x, [1, 0, 2])

    shape = tf.shape(image)
    shrink_h, shrink_w = shape[0] - size, shape[1] - size
    vertical_first = (shrink_h > 0) & (shrink_h > 2 * shrink_w)

    def resize():
        # Each pass resamples the leading axis: the width is put first for a horizontal pass.
        first = tf.cond(vertical_first, lambda: tf.identity(image), lambda: turn(image))
        both = _resample_rows(turn(_resample_rows(first, size)), size)
        return tf.cond(vertical_first, lambda: turn(both), lambda: tf.identity(both))

    same = tf.equal(shape[0], size) & tf.equal(shape[1], size)
    return tf.cond(same, lambda: tf.identity(image), resize)


def decode_image_tf(data, size: int):
    """Decode one encoded image (a scalar string tensor) to ``[size, size, 3]`` uint8, in stock TF ops.

    JPEG, PNG, GIF (first frame) and uncompressed BMP; any other format fails with an
    InvalidArgumentError that says so. ``load_image`` gives the same pixels for the same bytes.
    """
    import tensorflow as tf

    data = tf.convert_to_tensor(data, tf.string)
    head = tf.strings.substr(data, 0, 8)

    def starts(magic: bytes):
        return tf.equal(tf.strings.substr(head, 0, len(magic)), magic)

    def jpeg():
        # INTEGER_ACCURATE is libjpeg-turbo's default (JDCT_ISLOW): Pillow decodes with it too.
        # A CMYK JPEG comes out as RGB the way Pillow converts it (checked for Adobe-inverted files).
        pixels = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        return _orient(pixels, _jpeg_orientation(data))

    def png():
        return _orient(_png_pixels(data, _Bytes(tf.strings.substr(data, 0, 32))), _png_orientation(data))

    def unsupported():
        check = tf.debugging.Assert(False, ["not a JPEG, PNG, GIF or BMP image: serving_default cannot decode it"])
        with tf.control_dependencies([check]):
            return tf.zeros([1, 1, 3], tf.uint8)

    image = tf.case([(starts(_JPEG), jpeg), (starts(_PNG), png),
                     (starts(_GIF87) | starts(_GIF89), lambda: _gif_first_frame(data, _Bytes(data))),
                     (starts(_BMP), lambda: _bmp_pixels(data, _Bytes(data)))], default=unsupported)
    image = tf.ensure_shape(image, [None, None, 3])
    image = _resize_like_pillow(image, size)
    return tf.ensure_shape(image, [size, size, 3])


# --------------------------------------------------------------------------------------------
# The library entry point
# --------------------------------------------------------------------------------------------

_DECODERS: dict[int, Callable[[Any], Any]] = {}
_DECODERS_LOCK = threading.Lock()


def _tf_decoder(size: int) -> Callable[[Any], Any]:
    """``decode_image_tf`` traced once per size: an eager call per image would cost several ms."""
    with _DECODERS_LOCK:
        fn = _DECODERS.get(size)
        if fn is None:
            import tensorflow as tf

            fn = tf.function(lambda data: decode_image_tf(data, size),
                             input_signature=[tf.TensorSpec([], tf.string)])
            _DECODERS[size] = fn
        return fn


def _tf_reads(data: bytes, img: Image.Image) -> bool:
    """Whether ``decode_image_tf`` reads these bytes as they are (else they go through PNG first)."""
    if data.startswith(_BMP):
        if len(data) < 34:
            return False
        header, = struct.unpack_from("<I", data, 14)
        bits, = struct.unpack_from("<H", data, 28)
        compression, = struct.unpack_from("<I", data, 30)
        return header >= 40 and compression == 0 and bits in (8, 24, 32) and img.mode in ("RGB", "P", "L")
    if data.startswith(_PNG):
        return img.format == "PNG"
    if data.startswith(_JPEG):
        return img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L", "CMYK")
    return data.startswith((_GIF87, _GIF89)) and img.format == "GIF"


def _grey_to_8bit(arr: np.ndarray, floating: bool) -> np.ndarray:
    """Wide grey (16/32-bit int, float) into 8 bits: 16-bit range when used, else as is; float by its max."""
    arr = arr.astype(np.float64)
    hi = float(arr.max()) if arr.size else 0.0
    scale = (255.0 / hi if hi > 0 else 1.0) if floating else 255.0 / (65535.0 if hi > 255 else 255.0)
    return np.clip(arr * scale, 0, 255).astype(np.uint8)


def _as_png(img: Image.Image) -> bytes:
    """Re-encode a loaded Pillow image as PNG without losing what ``decode_image_tf`` would use."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # damaged EXIF: no orientation, as decode_image_tf treats it
        orientation = None
    mode = img.mode
    if mode.startswith("I;16"):
        img = Image.fromarray(np.asarray(img).astype(np.uint16))  # a 16-bit grey PNG
    elif mode in ("I", "F"):
        img = Image.fromarray(_grey_to_8bit(np.asarray(img), mode == "F"), mode="L")
    elif mode in ("PA", "RGBa", "La"):
        img = img.convert("RGBA")
    elif mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
    options: dict[str, Any] = {"compress_level": 1}
    if mode == "P" and "transparency" in img.info:
        options["transparency"] = img.info["transparency"]
    if isinstance(orientation, int) and 2 <= orientation <= 8:
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION] = orientation
        options["exif"] = exif
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _has_image_signature(data: bytes) -> bool:
    """Starts like an image format Pillow reads (so a failure is damage, not the wrong type)."""
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _needs_nothing_more(data: bytes, img: Image.Image, size: int) -> bool:
    """Whether Pillow's decode, just done, is already the answer. For an RGB JPEG of exactly
    ``size`` x ``size`` without an EXIF block, ``decode_image_tf`` does nothing but libjpeg-turbo's
    accurate integer decode (no orientation, no resize, no alpha): the pixels Pillow has, which are
    the spec that function reproduces to the bit (``pillow_reference`` in the tests). Skipping the
    second decode halves the CPU of a model-size photo: extraction shares the cores with the
    backbone, and the gateway with the decode loop."""
    return (data.startswith(_JPEG) and b"Exif\0\0" not in data and img.format == "JPEG"
            and img.mode == "RGB" and img.size == (size, size))


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
            # Pillow decodes in full first: it is the judge of damaged files, with the errors below.
            img.load()
            if _needs_nothing_more(data, img, size):
                return np.array(img)  # a writable copy, as the other paths return
            encoded = data if _tf_reads(data, img) else _as_png(img)
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
    return _decode(encoded, img, size, where)


def _decode(encoded: bytes, img: Image.Image, size: int, where: str) -> np.ndarray:
    import tensorflow as tf

    decoder = _tf_decoder(size)
    try:
        return decoder(tf.constant(encoded)).numpy()
    except tf.errors.InvalidArgumentError:
        # Pillow read it but TensorFlow's decoder does not (a rare variant of a format both know).
        try:
            return decoder(tf.constant(_as_png(img))).numpy()
        except tf.errors.InvalidArgumentError as again:
            raise ImageError(f"cannot decode image: {again.message.splitlines()[0]}", path=where) from None
