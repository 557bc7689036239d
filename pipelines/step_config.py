"""The ``config`` pipeline parameter: a preset name, a YAML path, or the resolved config as JSON.

A run submitted to a cluster cannot read a YAML file that exists only on the submitting machine, so
``captioner pipeline submit/schedule`` send the configuration resolved here (preset, file and
``--set`` overrides applied, validated) as JSON; the steps rebuild it with ``load_step_config``.
``kfp.local`` runs keep passing the name, which resolves the same way on this machine.
"""

from __future__ import annotations

import json
import os

from captioner.config import Config, config_from_dict, load_config, parse_overrides, with_overrides
from captioner.errors import ConfigError

QUIET_STEPS_ENV = "CAPTIONER_QUIET_STEPS"  # set by `pipeline run --local` unless --verbose

# Every step imports this module before anything imports TensorFlow.
if os.environ.get(QUIET_STEPS_ENV) == "1" and not os.environ.get("CAPTIONER_VERBOSE"):
    from captioner.cli import _quiet_tensorflow

    _quiet_tensorflow()


def embed_config(cfg: Config) -> str:
    """The resolved config as one JSON text (sorted keys: the same config gives the same parameter)."""
    return json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))


def is_embedded(config: str) -> bool:
    return config.lstrip().startswith("{")


def load_step_config(config: str, overrides: list | tuple = ()) -> Config:
    """What a pipeline step runs with: an embedded JSON config or a preset name / YAML path, then overrides."""
    if not is_embedded(config):
        return load_config(config, list(overrides))
    try:
        data = json.loads(config)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config parameter: invalid embedded JSON: {exc}", field="config") from None
    if not isinstance(data, dict):
        raise ConfigError("config parameter: embedded JSON must be an object", field="config")
    cfg = config_from_dict(data)
    return with_overrides(cfg, parse_overrides(list(overrides))) if overrides else cfg


def config_label(config: str) -> str:
    """A short name for run names and display names: the config's own name when embedded."""
    if is_embedded(config):
        try:
            return str(json.loads(config).get("name") or "custom")
        except (json.JSONDecodeError, AttributeError):
            return "custom"
    return config.rsplit("/", 1)[-1].removesuffix(".yaml").removesuffix(".yml")
