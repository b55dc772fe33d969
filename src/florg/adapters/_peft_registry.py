"""Register the ``"FLORG"`` PEFT type in PEFT's (private) method mappings.

PEFT's public ``register_peft_method`` only accepts names that already exist in its fixed
``PeftType`` enum, so a third-party tuner cannot use it. ``PeftType`` is a ``str`` enum,
however, so a plain string key such as ``"FLORG"`` hashes and compares like an enum member in
PEFT's dictionaries. This module is the single place that touches those private dictionaries:

* ``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``  (``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained``)
* ``peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING``   (``get_peft_model``, state-dict save/load)
* ``peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING``  (adapter-name checks, state-dict based injection)

The layout was verified against PEFT 0.21.2. Before registering, the shapes of the internals
used here are checked; if they changed, one ``RuntimeError`` names the installed and the
supported PEFT version. Registration is idempotent and happens on ``import florg.adapters``.
"""

from __future__ import annotations

import enum
import importlib
import warnings
from types import ModuleType
from typing import Any

import peft
from peft import mapping
from peft.utils import PeftType

__all__ = [
    "SUPPORTED_PEFT_VERSION",
    "check_peft_internals",
    "ensure_compatible_peft",
    "is_registered",
    "register_florg",
]

#: The PEFT release whose private mapping layout this module was written for.
SUPPORTED_PEFT_VERSION = "0.21.2"

_MAPPING_NAMES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")
# Other PEFT internals the tuner modules import: (module, attribute).
_REQUIRED_ATTRIBUTES = (
    ("peft.tuners.tuners_utils", "BaseTuner"),
    ("peft.tuners.tuners_utils", "BaseTunerLayer"),
    ("peft.tuners.tuners_utils", "check_adapters_to_merge"),
    ("peft.tuners.tuners_utils", "check_target_module_exists"),
    ("peft.tuners.tuners_utils", "_ExcludedModule"),
    ("peft.tuners._buffer_dict", "BufferDict"),
    ("peft.utils", "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"),
)


def _incompatible(version: str, detail: str) -> RuntimeError:
    return RuntimeError(
        f"florg cannot register its FLoRG tuner with the installed PEFT {version}: {detail}. "
        f"florg supports PEFT {SUPPORTED_PEFT_VERSION}; install it with `pip install peft=={SUPPORTED_PEFT_VERSION}`."
    )


def check_peft_internals(mapping_module: ModuleType, peft_type_enum: Any, version: str) -> None:
    """Raise ``RuntimeError`` unless PEFT's internals have the layout the registration relies on.

    ``mapping_module`` is ``peft.mapping`` and ``peft_type_enum`` is ``peft.utils.PeftType``
    (parameters so that the check itself can be tested against altered stand-ins).
    """
    for name in _MAPPING_NAMES:
        mapping = getattr(mapping_module, name, None)
        if not isinstance(mapping, dict):
            raise _incompatible(version, f"peft.mapping.{name} is missing or is not a dict")
    if "LORA" not in mapping_module.PEFT_TYPE_TO_CONFIG_MAPPING:
        raise _incompatible(version, "peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING has no 'LORA' entry")
    is_str_enum = isinstance(peft_type_enum, type) and issubclass(peft_type_enum, str)
    if not (is_str_enum and issubclass(peft_type_enum, enum.Enum)):
        raise _incompatible(version, "peft.utils.PeftType is no longer a str Enum, so string keys cannot be used")
    if "FLORG" in list(peft_type_enum):
        raise _incompatible(version, "PEFT now defines its own PeftType.FLORG, which would clash with florg's tuner")


def ensure_compatible_peft() -> str:
    """Check the installed PEFT before the tuner modules import its internals; return its version.

    Raises one ``RuntimeError`` (naming the installed and the supported version) if anything the
    FLoRG tuner relies on is missing; warns if the version differs but the layout still fits.
    """
    version = getattr(peft, "__version__", "unknown")
    check_peft_internals(mapping, PeftType, version)
    for module_name, attribute in _REQUIRED_ATTRIBUTES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # pragma: no cover - depends on the installed PEFT
            raise _incompatible(version, f"module {module_name} cannot be imported ({exc})") from exc
        if not hasattr(module, attribute):
            raise _incompatible(version, f"{module_name}.{attribute} is missing")
    if version != SUPPORTED_PEFT_VERSION:
        warnings.warn(
            f"florg was tested with PEFT {SUPPORTED_PEFT_VERSION}, found PEFT {version}; "
            "the FLoRG tuner relies on private PEFT internals and may misbehave.",
            RuntimeWarning,
            stacklevel=3,
        )
    return version


def is_registered() -> bool:
    """Whether the ``"FLORG"`` type is currently present in PEFT's mappings."""
    return all("FLORG" in getattr(mapping, name, {}) for name in _MAPPING_NAMES)


def register_florg() -> None:
    """Register ``FLoRGConfig``/``FLoRGModel`` under the PEFT type ``"FLORG"`` (idempotent).

    Raises ``RuntimeError`` if PEFT's mappings changed shape, or if ``"FLORG"`` or the ``florg_``
    prefix is already taken by a tuner that is not florg's.
    """
    from .florg.config import FLORG_PEFT_TYPE, FLoRGConfig  # lazy: tuner modules load after ensure_compatible_peft's check
    from .florg.model import FLoRGModel  # lazy: tuner modules load after ensure_compatible_peft's check

    version = getattr(peft, "__version__", "unknown")
    check_peft_internals(mapping, PeftType, version)

    existing = mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(FLORG_PEFT_TYPE)
    if existing is not None and not existing.__module__.startswith("florg."):
        raise _incompatible(version, f"the PEFT type {FLORG_PEFT_TYPE!r} is already registered by {existing!r}")
    prefix = FLoRGModel.prefix
    for peft_type, other_prefix in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_prefix == prefix and peft_type != FLORG_PEFT_TYPE:
            raise _incompatible(version, f"the adapter prefix {prefix!r} is already used by PEFT type {peft_type!r}")

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[FLORG_PEFT_TYPE] = FLoRGConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[FLORG_PEFT_TYPE] = FLoRGModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[FLORG_PEFT_TYPE] = prefix
