"""Shared settings machinery: the ZK0_ prefix, Flower-config conversion, clear errors, common helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ZK0_"


class SettingsError(ValueError):
    """A setting is invalid; the message names the variable and what to do."""


class _Zk0Settings(BaseSettings):
    """Shared behaviour: ZK0_ prefix, kebab-case at the Flower boundary, clear errors."""

    # An empty variable means unset: Compose passes `ZK0_X: ${ZK0_X:-}` for every setting.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", validate_default=True, env_ignore_empty=True
    )

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Build from the environment; `overrides` (snake_case) outrank it."""
        try:
            return cls(**{k: v for k, v in overrides.items() if v not in (None, "")})
        except ValidationError as err:
            raise SettingsError(_explain(cls, err)) from None

    @classmethod
    def from_flower_config(cls, config: dict[str, Any]) -> Self:
        """Build from a Flower run/node config (kebab-case keys; empty string means unset)."""
        known = cls.model_fields
        overrides = {k.replace("-", "_"): v for k, v in config.items()}
        return cls.load(**{k: v for k, v in overrides.items() if k in known})

    def to_flower_config(self) -> dict[str, Any]:
        """Kebab-case, TOML-friendly copy for `--run-config` / `--node-config`."""
        out = {}
        for key, value in self.model_dump(exclude_none=True).items():
            out[key.replace("_", "-")] = str(value) if isinstance(value, Path) else value
        return out

    @classmethod
    def env_names(cls) -> set[str]:
        """Every environment variable this class reads."""
        return {f"{ENV_PREFIX}{name.upper()}" for name in cls.model_fields}


def default_cache_dir() -> Path:
    """Where converted datasets go unless ZK0_CACHE_DIR says otherwise: $XDG_CACHE_HOME/zk0 or ~/.cache/zk0."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zk0"


def _explain(cls: type[BaseSettings], err: ValidationError) -> str:
    lines = [f"invalid {cls.__name__}:"]
    for e in err.errors():
        if not e["loc"]:  # a check across settings: its message names the variables itself
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        field = str(e["loc"][0])
        var = f"{ENV_PREFIX}{field.upper()} (run/node config '{field.replace('_', '-')}')"
        hint = cls.model_fields[field].description if field in cls.model_fields else ""
        lines.append(f"  {var}: {e['msg']}; got {e.get('input')!r}. {hint}")
    return "\n".join(lines)


def resolve_device(device: str) -> str:
    """Turn 'auto' into cuda when a GPU is visible, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
