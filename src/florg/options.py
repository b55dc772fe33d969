"""What a config field is and how a bad value is reported: the leaf below the config tree.

:class:`ConfigError`, :func:`option` (a dataclass field with its help text and metadata) and :func:`need`
(raise a ``ConfigError`` naming the key). Every layer that declares or checks settings imports them from
here: :mod:`florg.config` (which re-exports them), each method's options class in :mod:`florg.methods`,
and :mod:`florg.core`. This module imports nothing of florg, so none of those imports can form a circle.

Field metadata that :func:`option` passes through (``**kw``) and that florg reads:

* ``choices``: the valid values (checked by :func:`florg.config.validate`), ``renamed``: old names of choices;
* ``key``: the config key when it differs from the attribute name (``method.fedsa-lora``);
* ``strategy_keyword``: the keyword argument of the drop-in Flower strategies (:mod:`florg.fl.florg_strategy`)
  that sets this field, e.g. ``FLoRG(rank=8)`` for ``method.rank``.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

__all__ = ["ConfigError", "need", "option"]


class ConfigError(ValueError):
    """A bad configuration value. The message names the field and the fix."""


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (and optional ``choices``, ``strategy_keyword``, ...), as every field of the
    tree uses."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def need(cond: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError("config key '<key>': <msg>")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")
