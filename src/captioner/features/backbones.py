"""Registry of image backbones that turn ``[B, S, S, 3]`` pixels (0..255) into spatial features ``[B, N, C]``.

Each backbone includes its own input scaling, so the exported graph and the feature cache see the
same function. ImageNet weights come from the Keras cache (``$KERAS_HOME/models``, default
``~/.keras/models``); nothing is downloaded when the file is already there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from captioner.errors import ModelError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[str, int], object]  # (weights, image_size) -> keras.Model
    # Keras cache file holding ImageNet weights (no top), for a clear error when it is missing.
    weights_file: str | None
    description: str
    # Input sizes with weights of their own (``{size}`` in weights_file); at any other size Keras
    # loads the first size's file into the same convolutions (a larger input gives a larger grid).
    weight_sizes: tuple[int, ...] = ()

    def weights_path(self, image_size: int) -> str | None:
        if self.weights_file is None:
            return None
        own = image_size if image_size in self.weight_sizes or not self.weight_sizes else self.weight_sizes[0]
        return self.weights_file.format(size=own)


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def _spatial(keras, inputs, features):
    height, width, channels = features.shape[1], features.shape[2], features.shape[3]
    outputs = keras.layers.Reshape((height * width, channels), name="spatial_features")(features)
    return keras.Model(inputs, outputs)


def _applications_backbone(constructor: str, scale: Callable, **kwargs):
    def build(weights: str, image_size: int):
        import keras

        inputs = keras.Input((image_size, image_size, 3), name="pixels")
        base = getattr(keras.applications, constructor)(
            include_top=False, weights=None if weights == "none" else weights,
            input_shape=(image_size, image_size, 3), **kwargs)
        base.trainable = False
        return _spatial(keras, inputs, base(scale(keras, inputs), training=False))

    return build


def _mobilenet_scale(keras, x):
    return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_minus1_1")(x)


def _identity_scale(keras, x):
    # EfficientNet and MobileNetV3 in Keras rescale inside the model.
    return x


def _build_patches(weights: str, image_size: int):
    """Weight-free features: the image cut into an 8x8 grid, each cell's pixels flattened.

    For offline runs and tests: deterministic, no download, fast; enough for the synthetic data.
    """
    import keras
    import tensorflow as tf

    if weights != "none":
        raise ModelError("backbone 'patches' has no pretrained weights; set features.weights=none",
                         field="features.weights")
    if image_size % 8:
        raise ModelError(f"backbone 'patches' needs features.image_size divisible by 8, got {image_size}",
                         field="features.image_size")
    block = image_size // 8

    class SpaceToDepth(keras.layers.Layer):
        def call(self, x):
            return tf.nn.space_to_depth(x, block)

        def compute_output_shape(self, shape):
            return (shape[0], 8, 8, block * block * 3)

    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    return _spatial(keras, inputs, SpaceToDepth(name="space_to_depth")(scaled))


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("mobilenet_v1_075", _applications_backbone("MobileNet", _mobilenet_scale, alpha=0.75),
                     "mobilenet_7_5_{size}_tf_no_top.h5",
                     "MobileNet v1, alpha 0.75: 7x7x768 at 224, 9x9 at 288, 10x10 at 320",
                     weight_sizes=(224, 128, 160, 192)),
        BackboneSpec("efficientnet_b0", _applications_backbone("EfficientNetB0", _identity_scale),
                     "efficientnetb0_notop.h5", "EfficientNetB0: 7x7x1280 at 224"),
        BackboneSpec("mobilenet_v3_large",
                     _applications_backbone("MobileNetV3Large", _identity_scale, include_preprocessing=True),
                     "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", "MobileNetV3Large: 7x7x960 at 224"),
        BackboneSpec("inception_v3", _applications_backbone("InceptionV3", _mobilenet_scale),
                     "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "InceptionV3: 8x8x2048 at 299"),
        BackboneSpec("patches", _build_patches, None, "weight-free 8x8 grid of raw pixel patches (offline)"),
    )
}


def build_backbone(name: str, weights: str = "imagenet", image_size: int = 224):
    """Build the named backbone as a frozen ``keras.Model``: pixels -> ``[B, N, C]``."""
    try:
        spec = BACKBONES[name]
    except KeyError:
        raise ModelError(f"unknown backbone {name!r}; backbones: {', '.join(BACKBONES)}",
                         field="features.backbone") from None
    if weights == "imagenet" and spec.weights_file:
        expected = keras_cache_dir() / spec.weights_path(image_size)
        if not expected.is_file():
            raise ModelError(
                f"ImageNet weights for {name} not found at {expected}: copy them there (offline: "
                "`make weights` copies ../shared/weights/keras/models), or set features.weights=none",
                field="features.weights")
    try:
        return spec.build(weights, image_size)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot build backbone {name} ({weights}, {image_size}px): {exc}",
                         field="features.backbone") from exc
