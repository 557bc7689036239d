"""captioner: attention-based image captioning, trained by a KFP pipeline, served through TF Serving.

The public API is imported lazily so that ``import captioner`` does no work (no TensorFlow import).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "caption_images": "captioner.predictor",
    "SavedModelCaptioner": "captioner.predictor",
    "ExperimentTracker": "captioner.tracking",
    "set_global_seed": "captioner.tracking",
    "load_config": "captioner.config",
    "Config": "captioner.config",
    "run_training": "captioner.workflow",
    "Tokenizer": "captioner.data.tokenizer",
}

def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
