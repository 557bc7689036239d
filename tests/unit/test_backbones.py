import numpy as np
import pytest

from captioner.errors import ModelError
from captioner.features.backbones import BACKBONES, build_backbone

from ..conftest import FLICKR8K, needs_flickr8k, needs_weights

pytestmark = pytest.mark.unit


def test_registry_lists_the_backbones():
    assert {"mobilenet_v1_075", "efficientnet_b0", "mobilenet_v3_large", "inception_v3", "patches"} <= set(BACKBONES)


def test_patches_backbone_is_weight_free_and_spatial():
    model = build_backbone("patches", "none", 64)
    out = model(np.zeros((2, 64, 64, 3), np.float32)).numpy()
    assert out.shape == (2, 64, 192)
    with pytest.raises(ModelError, match="features.weights=none"):
        build_backbone("patches", "imagenet", 64)


def test_mobilenet_without_weights_builds_offline():
    assert build_backbone("mobilenet_v1_075", "none", 224).output_shape == (None, 49, 768)


def test_missing_imagenet_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"ImageNet weights for efficientnet_b0 not found at .*models"):
        build_backbone("efficientnet_b0", "imagenet", 224)
    with pytest.raises(ModelError, match="unknown backbone 'resnet'"):
        build_backbone("resnet", "imagenet", 224)


@needs_weights
@needs_flickr8k
def test_imagenet_mobilenet_features_of_a_real_image():
    from captioner.data.images import load_image

    model = build_backbone("mobilenet_v1_075", "imagenet", 224)
    image = load_image(FLICKR8K / "images" / "2513260012_03d33305cf.jpg", 224)[None].astype(np.float32)
    features = model(image).numpy()
    assert features.shape == (1, 49, 768) and features.min() >= 0 and features.mean() > 0.01


@needs_weights
def test_mobilenet_at_a_larger_input_gives_a_larger_grid_with_the_224_weights():
    """Issue #9's larger feature grid: Keras has MobileNet weights for 128-224 px only and loads the
    224 px file at other sizes; the same convolutions on a 288 px input give 9x9 regions."""
    from captioner.features.backbones import BACKBONES

    assert BACKBONES["mobilenet_v1_075"].weights_path(288) == "mobilenet_7_5_224_tf_no_top.h5"
    assert BACKBONES["mobilenet_v1_075"].weights_path(160) == "mobilenet_7_5_160_tf_no_top.h5"
    large = build_backbone("mobilenet_v1_075", "imagenet", 288)
    small = build_backbone("mobilenet_v1_075", "imagenet", 224)
    assert large.output_shape == (None, 81, 768)
    assert all(np.array_equal(a, b) for a, b in zip(large.get_weights(), small.get_weights(), strict=True))


@needs_flickr8k
def test_reads_the_real_flickr8k_split():
    from captioner.data.readers import read_dataset

    data = read_dataset(FLICKR8K)
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 6000, "dev": 1000, "test": 1000}
    assert all(len(data.captions[i]) == 5 for i in data.all_images())
