"""Federated methods: one file per method (client adapter shape + server rule)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import FederatedMethod
from .florg import FLoRGMethod

if TYPE_CHECKING:
    from florg.config import RunConfig

METHODS: dict[str, type[FederatedMethod]] = {
    FLoRGMethod.name: FLoRGMethod,
}


def get_method(cfg: RunConfig) -> FederatedMethod:
    """Instantiate the method named by ``cfg.method.name``."""
    from florg.config import ConfigError

    try:
        cls = METHODS[cfg.method.name]
    except KeyError:
        raise ConfigError(
            f"config key 'method.name': unknown method {cfg.method.name!r}; valid methods: {', '.join(sorted(METHODS))}"
        ) from None
    return cls(cfg)


__all__ = ["FederatedMethod", "FLoRGMethod", "METHODS", "get_method"]
