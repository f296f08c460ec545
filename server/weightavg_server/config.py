"""Server configuration: one frozen dataclass, defaults as constants, WEIGHTAVG_* environment overrides."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

ENV_PREFIX = "WEIGHTAVG_"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_DEVICE = "auto"
DEFAULT_MAX_WORKERS = 32
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_MAX_UPLOAD_BYTES = 1 << 40
DEFAULT_MAX_SPEC_DEPTH = 32
DEFAULT_GRACE_SECONDS = 10.0
DEFAULT_KEEPALIVE_TIME_SECONDS = 60.0
DEFAULT_KEEPALIVE_TIMEOUT_SECONDS = 20.0
DEFAULT_METRICS_PORT = -1
"""-1: no metrics endpoint; 0 picks a free port; anything else is the port."""
DEFAULT_LOG_LEVEL = "INFO"


@dataclass(frozen=True)
class ServerConfig:
    """Everything `create_server` needs; every field can be set by flag or by WEIGHTAVG_<FIELD>."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    device: str = DEFAULT_DEVICE
    max_workers: int = DEFAULT_MAX_WORKERS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_spec_depth: int = DEFAULT_MAX_SPEC_DEPTH
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    keepalive_time_seconds: float = DEFAULT_KEEPALIVE_TIME_SECONDS
    keepalive_timeout_seconds: float = DEFAULT_KEEPALIVE_TIMEOUT_SECONDS
    metrics_port: int = DEFAULT_METRICS_PORT
    log_level: str = DEFAULT_LOG_LEVEL

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> "ServerConfig":
        """Defaults, then WEIGHTAVG_* variables, then explicit overrides (None means not given)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                kind = type(getattr(cls, f.name))
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
