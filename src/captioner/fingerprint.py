"""The pipeline's run fingerprint: what the data, the code and the config were, in one string.

The pipeline's first step computes it (never from the cache) and hands it to every step that reads
data as an input parameter. KFP (Kubeflow, Vertex and ``kfp.local`` alike) keys its step cache on
a task's inputs, so a step whose fingerprint input changed runs again, and one whose fingerprint
did not comes from the cache. Without it, a scheduled run over a grown data folder would look the
same as last week's (same config name, same overrides) and retrain nothing.

Format: ``data=<16 hex>;code=<version>[@sha256:<12 hex>];config=<12 hex>``, where ``data`` is
``CaptionDataset.fingerprint()`` (captions, splits, image listing), ``code`` the package version and
the component image digest when the image is pinned by digest, and ``config`` a hash of the
resolved configuration (preset files can change with the package).
"""

from __future__ import annotations

import hashlib
import json

from captioner.config import Config
from captioner.data.readers import CaptionDataset
from captioner.errors import DataError


def code_version(image: str = "") -> str:
    """The package version, plus the image digest when ``image`` is pinned (``...@sha256:...``)."""
    import captioner

    version = captioner.__version__
    if "@sha256:" in image:
        version += "@sha256:" + image.split("@sha256:", 1)[1][:12]
    return version


def config_digest(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_fingerprint(cfg: Config, dataset: CaptionDataset, image: str = "") -> str:
    return f"data={dataset.fingerprint()};code={code_version(image)};config={config_digest(cfg)}"


def parse(fingerprint: str) -> dict[str, str]:
    parts = dict(part.split("=", 1) for part in fingerprint.split(";") if "=" in part)
    if not {"data", "code", "config"} <= set(parts):
        raise DataError(f"not a run fingerprint (expected data=...;code=...;config=...): {fingerprint!r}")
    return parts


def check_unchanged(fingerprint: str, dataset: CaptionDataset) -> str:
    """Raise if the data changed since the fingerprint step looked at it; returns the data part.

    A step's outputs are cached under its fingerprint input: outputs computed from other data
    than the fingerprint describes would be served to later runs as if they matched it.
    """
    expected = parse(fingerprint)["data"]
    actual = dataset.fingerprint()
    if actual != expected:
        raise DataError(f"the data changed while the pipeline ran (fingerprint step saw {expected}, this step "
                        f"sees {actual}); run the pipeline again once the data folder is stable",
                        path=str(dataset.images_dir.parent))
    return actual
