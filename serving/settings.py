"""Gateway settings: read from the environment (``CAPTIONER_*``) and flags inside ``create_app``, never
at import time."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from captioner import constants as C


@dataclass(frozen=True)
class Settings:
    backend: str = "local"                 # local | tfserving
    model_repo: str = "models"             # local backend: the model repository (TF Serving layout)
    model_name: str = "captioner"
    model_dir: str = ""                    # local backend: serve this SavedModel folder instead
    poll_seconds: float = 5.0              # local backend: how often to look for a new version
    # local backend: concurrent requests share encode and decode_step calls (serving/batching.py)
    batching: bool = False                 # CAPTIONER_BATCHING=on|off (off: see BENCHMARKS)
    batch_max_size: int = 128              # rows (images x beams) of one batched model call
    batch_timeout_ms: float = 1.0          # how long an idle scheduler waits for more requests
    batch_encode_wait_ms: float = 20.0     # how long a request waits for others to encode with, while others decode
    # local backend: threads one TensorFlow op may use (0: TensorFlow's default, one per core). Requests
    # run in parallel threads, so an op's own threads only add hand-offs: on 2 cores 1 gives one
    # client +13% and 16 clients +8-60% (BENCHMARKS, "Batching across requests").
    intra_op_threads: int = 1
    tfserving_target: str = "localhost:8500"
    model_label: str = "stable"            # tfserving backend: serve this version label (newest if unassigned)
    model_version: int = 0                 # tfserving backend: or pin this version number (0: use the label)
    deadline_seconds: float = 10.0         # per request, over all gRPC calls
    retries: int = 2                       # per gRPC call, on UNAVAILABLE
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 8                    # per request
    # May lower, never raise, the limits shared with the CLI (captioner.constants).
    max_beam_size: int = C.MAX_BEAM_SIZE
    max_caption_length: int = C.MAX_CAPTION_LENGTH
    # 0: each model's own, the beam its export was tuned and evaluated with (metadata beam_size).
    default_beam_size: int = 0
    cors_origins: tuple[str, ...] = ()
    api_key: str = ""                      # when set, /predict and /model/info need X-API-Key (comma-separated:
    api_keys: tuple[str, ...] = ()         # several keys, as has API_KEYS: any one is accepted, for rotation)
    log_requests: bool = True
    # `captioner serve`: the whole request is read before a thread runs the app (see serving/server.py)
    header_timeout_seconds: float = 10.0   # the request line and headers must arrive within this
    client_timeout_seconds: float = 30.0   # a connection silent this long is closed (body, keep-alive)
    max_connections: int = 1000            # open connections per worker process

    @property
    def keys(self) -> tuple[str, ...]:
        """Every accepted API key: ``api_keys`` and the comma-separated parts of ``api_key``."""
        parts = [*self.api_keys, *self.api_key.split(",")]
        return tuple(dict.fromkeys(k.strip() for k in parts if k.strip()))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f"CAPTIONER_{f.name.upper()}")
            if raw is None:
                continue
            values[f.name] = _parse(raw, f)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if settings.backend not in ("local", "tfserving"):
            raise ValueError(f"CAPTIONER_BACKEND={settings.backend!r}: expected local or tfserving")
        raw = environ.get("CAPTIONER_BATCHING")
        if raw is not None and raw.strip().lower() not in _SWITCH:  # a typo must not switch it off silently
            raise ValueError(f"CAPTIONER_BATCHING={raw!r}: expected on or off")
        for name in ("batch_timeout_ms", "batch_encode_wait_ms"):
            if getattr(settings, name) < 0:
                raise ValueError(f"CAPTIONER_{name.upper()}={getattr(settings, name)!r}: must be 0 or more")
        if settings.intra_op_threads < 0:
            raise ValueError(f"CAPTIONER_INTRA_OP_THREADS={settings.intra_op_threads!r}: must be 0 (TensorFlow's "
                             "default) or more")
        for name in ("header_timeout_seconds", "client_timeout_seconds", "max_connections", "max_images",
                     "batch_max_size"):
            if getattr(settings, name) <= 0:  # 0 would cut every connection or accept none
                raise ValueError(f"CAPTIONER_{name.upper()}={getattr(settings, name)!r}: must be positive")
        limits = (("max_beam_size", C.MIN_BEAM_SIZE, C.MAX_BEAM_SIZE),
                  ("max_caption_length", C.MIN_CAPTION_LENGTH, C.MAX_CAPTION_LENGTH),
                  ("default_beam_size", C.MIN_BEAM_SIZE, settings.max_beam_size))
        for name, low, high in limits:
            if name == "default_beam_size" and settings.default_beam_size == 0:
                continue
            if not low <= getattr(settings, name) <= high:
                raise ValueError(f"CAPTIONER_{name.upper()}={getattr(settings, name)!r}: must be between "
                                 f"{low} and {high}")
        return settings


_SWITCH = ("1", "0", "true", "false", "yes", "no", "on", "off")


def _parse(raw: str, f: dataclasses.Field) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    name = f"CAPTIONER_{f.name.upper()}"
    try:
        if kind == "bool":
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind}") from None
    return raw


__all__ = ["Settings"]
