"""Federated methods: one file per method (client adapter shape + server rule), listed in :mod:`.registry`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from florg.options import ConfigError

from .base import FederatedMethod
from .federa import FeDeRAMethod
from .fedex_lora import FedExLoRAMethod
from .fedit import FedITMethod
from .fedsa_lora import FedSALoRAMethod
from .ffa_lora import FFALoRAMethod
from .flora import FLoRAMethod
from .florg import FLoRGMethod
from .registry import METHODS, REGISTRY, compare_rows

if TYPE_CHECKING:
    from florg.config import RunConfig


def get_method(cfg: RunConfig) -> FederatedMethod:
    """Instantiate the method named by ``cfg.method.name`` (its ``check_config`` runs first)."""

    try:
        cls = METHODS[cfg.method.name]
    except KeyError:
        raise ConfigError(
            f"config key 'method.name': unknown method {cfg.method.name!r}; valid methods: {', '.join(sorted(METHODS))}"
        ) from None
    return cls(cfg)


__all__ = [
    "FederatedMethod",
    "FedExLoRAMethod",
    "FeDeRAMethod",
    "FedITMethod",
    "FedSALoRAMethod",
    "FFALoRAMethod",
    "FLoRAMethod",
    "FLoRGMethod",
    "METHODS",
    "REGISTRY",
    "compare_rows",
    "get_method",
]
