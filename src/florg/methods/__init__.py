"""Federated methods: one file per method (client adapter shape + server rule)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import FederatedMethod
from .fedex_lora import FedExLoRAMethod
from .federa import FeDeRAMethod
from .fedit import FedITMethod
from .fedsa_lora import FedSALoRAMethod
from .ffa_lora import FFALoRAMethod
from .flora import FLoRAMethod
from .florg import FLoRGMethod

if TYPE_CHECKING:
    from florg.config import RunConfig

METHODS: dict[str, type[FederatedMethod]] = {
    FLoRGMethod.name: FLoRGMethod,
    FedITMethod.name: FedITMethod,
    FeDeRAMethod.name: FeDeRAMethod,
    FFALoRAMethod.name: FFALoRAMethod,
    FedSALoRAMethod.name: FedSALoRAMethod,
    FedExLoRAMethod.name: FedExLoRAMethod,
    FLoRAMethod.name: FLoRAMethod,
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
    "get_method",
]
