"""The method registry: one line per federated method.

``REGISTRY`` is the single list of methods. Everything that enumerates methods derives from it:
``method.name``'s valid values, the ``method.<name>.*`` config sections (each method's
``options_class``) and its recommended settings, which this module hands to :mod:`florg.config`
through :func:`florg.config.register_methods` when it is imported (the config never imports a method),
and the rows of ``florg compare`` with their display names (each method, followed by its
non-ablation variants; ablation variants last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from florg.config import MethodSection, register_methods

from .base import FederatedMethod
from .federa import FeDeRAMethod
from .fedex_lora import FedExLoRAMethod
from .fedit import FedITMethod
from .fedsa_lora import FedSALoRAMethod
from .ffa_lora import FFALoRAMethod
from .flora import FLoRAMethod
from .florg import FLoRGMethod

__all__ = ["REGISTRY", "METHODS", "CompareRow", "compare_rows", "config_sections", "option_classes"]

#: every federated method, in the order of the comparison tables (the paper's, then FLoRA)
REGISTRY: list[type[FederatedMethod]] = [
    FLoRGMethod,
    FedITMethod,
    FeDeRAMethod,
    FFALoRAMethod,
    FedSALoRAMethod,
    FedExLoRAMethod,
    FLoRAMethod,
]

METHODS: dict[str, type[FederatedMethod]] = {cls.name: cls for cls in REGISTRY}


def option_classes() -> dict[str, type]:
    """``{method name: options dataclass}`` for the methods that declare own options."""
    return {cls.name: cls.options_class for cls in REGISTRY if cls.options_class is not None}


def config_sections() -> dict[str, MethodSection]:
    """What the config tree needs of each method, in registry order: its ``method.<name>.*`` options class
    and its recommended settings (read on every call, so a method added at run time joins the config)."""
    return {cls.name: MethodSection(cls.options_class, dict(cls.recommended or {})) for cls in REGISTRY}


register_methods(config_sections)  # the config's method sections and recommended settings come from here


@dataclass(frozen=True)
class CompareRow:
    """One row of ``florg compare``: a method, or a named variant of one (``options`` = ``method.<name>.*``
    values, ``shared`` = ``method.*`` values)."""

    label: str
    method: str
    display_name: str
    options: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    ablation: bool = False


def compare_rows() -> list[CompareRow]:
    """Every comparison row in table order: methods with their variants, then the ablation rows."""
    main: list[CompareRow] = []
    ablations: list[CompareRow] = []
    for cls in REGISTRY:
        main.append(CompareRow(cls.name, cls.name, cls.display_name or cls.name))
        for label, var in cls.variants.items():
            row = CompareRow(label, cls.name, var.display_name, dict(var.options), dict(var.shared), var.ablation)
            (ablations if var.ablation else main).append(row)
    return main + ablations
