"""One preprocessing in the graph and in the library, checked on variants of real Flickr8k photos.

Ten photos, seven variants each (the original JPEG, EXIF orientation 6, RGBA with transparent bands,
an odd size, CMYK, greyscale, an upscaled PNG): the in-graph ``decode_image_tf`` gives the pixels of
``load_image`` (and of the Pillow pipeline the features were computed with), and the exported
``serving_default``, loaded the way TensorFlow Serving loads it, captions them as the library does.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from captioner import constants as C
from captioner.data.images import _tf_decoder, load_image

from ..conftest import FLICKR8K, needs_flickr8k
from ..unit.test_images import pillow_reference

pytestmark = [pytest.mark.integration, pytest.mark.shared, needs_flickr8k]

PHOTOS = 10
VARIANTS = ("original", "exif-6", "rgba-bands", "odd-301x187", "cmyk", "grey", "upscaled-517-png")


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _variants(original: bytes) -> dict[str, bytes]:
    img = Image.open(io.BytesIO(original)).convert("RGB")
    width, height = img.size
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to display": stored a quarter turn counter-clockwise
    alpha = np.full((height, width), 255, np.uint8)
    alpha[height // 3: height // 2] = 0
    alpha[:, width // 2: width // 2 + 30] = 128
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return {
        "original": original,
        # Quality 100 without chroma subsampling: the upright pixels come back within a level or two.
        "exif-6": _save(img.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=100, subsampling=0, exif=exif),
        "rgba-bands": _save(rgba, "PNG"),
        "odd-301x187": _save(img.resize((301, 187), Image.Resampling.BICUBIC), "JPEG", quality=90),
        "cmyk": _save(img.convert("CMYK"), "JPEG", quality=90),
        "grey": _save(img.convert("L"), "JPEG", quality=90),
        "upscaled-517-png": _save(img.resize((517, 517), Image.Resampling.BICUBIC), "PNG"),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[tuple[str, str, Path]]:
    """``(photo, variant, path)`` for 10 photos x 7 variants, written to files."""
    folder = tmp_path_factory.mktemp("parity")
    photos = sorted((FLICKR8K / "images").glob("*.jpg"))[:PHOTOS]
    assert len(photos) == PHOTOS
    out = []
    for photo in photos:
        for variant, data in _variants(photo.read_bytes()).items():
            suffix = "png" if data.startswith(b"\x89PNG") else "jpg"
            path = folder / f"{photo.stem}-{variant}.{suffix}"
            path.write_bytes(data)
            out.append((photo.stem, variant, path))
    return out


@pytest.mark.parametrize("size", [64, 224])
def test_graph_pixels_equal_library_and_pillow(corpus, size):
    graph = _tf_decoder(size)  # decode_image_tf in a tf.function: no Pillow, no fallback
    upright = {}
    for photo, variant, path in corpus:
        data = path.read_bytes()
        pixels = graph(tf.constant(data)).numpy()
        np.testing.assert_array_equal(pixels, load_image(path, size), err_msg=f"{photo} {variant}")
        np.testing.assert_array_equal(pixels, pillow_reference(data, size), err_msg=f"{photo} {variant}")
        if variant == "original":
            upright[photo] = pixels.astype(int)
        elif variant == "exif-6":
            # Turned back upright: close to the original (only the JPEG re-encoding differs).
            assert np.abs(pixels - upright[photo]).mean() < 1.5, photo


def _serve(saved_model: Path, images: list[bytes]) -> list[str]:
    """serving_default through the TF1 session loader, as TensorFlow Serving runs it."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, [C.SERVE_TAG], str(saved_model))
        sig = meta.signature_def[C.SIG_SERVING]
        out = sess.run(sig.outputs[C.OUT_CAPTIONS].name,
                       {sig.inputs[C.IN_IMAGE_BYTES].name: np.array(images, dtype=object)})
    return [caption.decode() for caption in out]


def test_serving_default_captions_like_the_library(smoke_run, corpus):
    from captioner.predictor import SavedModelCaptioner

    out, cfg = smoke_run
    paths = [path for _, _, path in corpus]
    served = _serve(out / "saved_model", [path.read_bytes() for path in paths])
    library = [r.caption for r in SavedModelCaptioner(out / "saved_model").caption_files(
        paths, beam_size=cfg.decode.beam_size)]
    same = [s == lib for s, lib in zip(served, library, strict=True)]
    differing = [(photo, variant, s, lib) for (photo, variant, _), s, lib, ok
                 in zip(corpus, served, library, same, strict=True) if not ok]
    assert sum(same) >= 0.95 * len(corpus), differing
    captions = {(photo, variant): caption for (photo, variant, _), caption in zip(corpus, served, strict=True)}
    photos = sorted({photo for photo, _, _ in corpus})
    # Seen upright, a rotated photo gets the original's caption. Its pixels differ slightly (the JPEG
    # is re-encoded; test_graph_pixels_equal_library_and_pillow bounds that), which can flip one word
    # of a real model's caption (the Flickr8k SCST model: "sitting" -> "jumping" on one photo of 10).
    upright = [photo for photo in photos if captions[photo, "exif-6"] == captions[photo, "original"]]
    assert len(upright) >= 0.9 * len(photos), sorted(set(photos) - set(upright))
