"""Shared fixtures. Keras reads KERAS_HOME when it is imported, so it is set here, before any test
module imports TensorFlow: a writable cache under the repository with the offline ImageNet weights
copied from ../shared when they are there."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAPTIONER_SHARED", ROOT.parent / "shared")).resolve()
FLICKR8K = SHARED / "data" / "flickr8k"
WEIGHTS = SHARED / "weights" / "keras" / "models"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_HOME", str(ROOT / ".cache" / "keras"))
_models = Path(os.environ["KERAS_HOME"]) / "models"
if WEIGHTS.is_dir():
    _models.mkdir(parents=True, exist_ok=True)
    for weights in WEIGHTS.glob("*.h5"):
        if not (_models / weights.name).is_file():
            shutil.copyfile(weights, _models / weights.name)

needs_flickr8k = pytest.mark.skipif(not (FLICKR8K / "captions.tsv").is_file(),
                                    reason=f"real Flickr8k data not found at {FLICKR8K} (../shared is absent)")
needs_weights = pytest.mark.skipif(not (_models / "mobilenet_7_5_224_tf_no_top.h5").is_file(),
                                   reason=f"MobileNet ImageNet weights not found in {WEIGHTS} (../shared is absent)")


@pytest.fixture(scope="session", autouse=True)
def captioner_cache(tmp_path_factory):
    """Synthetic data and feature caches live in one session folder, shared by the tests."""
    folder = tmp_path_factory.mktemp("captioner-cache")
    old = os.environ.get("CAPTIONER_CACHE")
    os.environ["CAPTIONER_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("CAPTIONER_CACHE", None)
    else:
        os.environ["CAPTIONER_CACHE"] = old


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, captioner_cache):
    """One complete `captioner train --config smoke` run, shared by the tests that inspect its outputs.

    ``CAPTIONER_TEST_RUN=<run folder>`` puts a finished run of any preset in its place, so that the
    serving tests (session loader, serving_default equals the library, the TF Serving contract, the
    gateway) check that run's SavedModel, e.g. the Flickr8k recipe's (BENCHMARKS.md)."""
    from captioner.config import config_from_dict, load_config
    from captioner.workflow import run_training

    given = os.environ.get("CAPTIONER_TEST_RUN")
    if given:
        run = Path(given)
        if not (run / "saved_model" / "saved_model.pb").is_file():
            pytest.fail(f"CAPTIONER_TEST_RUN={given} is not a finished run folder (no saved_model/)")
        # model.json's config carries the decoding chosen after training (e.g. a tuned length penalty).
        return run, config_from_dict(json.loads((run / "model.json").read_text())["config"])
    out = tmp_path_factory.mktemp("smoke") / "run"
    cfg = load_config("smoke")
    run_training(cfg, out, progress=False)
    return out, cfg
