"""The FLoRG tuner in PEFT's layout: config, layers and the ``BaseTuner``."""

from .config import FLORG_PEFT_TYPE, FLoRGConfig
from .layer import FLoRGLayer, Linear, clean_module_name
from .model import FLoRGModel, florg_layers, get_florg_factors, set_florg_factors
from .stored_bases import BasisStore, basis_store, get_bases

__all__ = [
    "BasisStore",
    "FLORG_PEFT_TYPE",
    "FLoRGConfig",
    "FLoRGLayer",
    "FLoRGModel",
    "Linear",
    "basis_store",
    "clean_module_name",
    "florg_layers",
    "get_bases",
    "get_florg_factors",
    "set_florg_factors",
]
