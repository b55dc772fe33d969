"""Deprecated alias of :mod:`florg.study.compare` (``florg compare``), kept for one release.

A public name of the old module is looked up in :mod:`florg.study.compare` on first use (with a
DeprecationWarning); this module imports nothing of the study, nor :mod:`florg.fl`, until then.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_HOME = "florg.study.compare"


def __getattr__(name: str) -> Any:
    module = importlib.import_module(_HOME)
    if name in module.__all__:
        warnings.warn(f"florg.run.compare is deprecated; import {name} from {_HOME}", DeprecationWarning, stacklevel=2)
        return getattr(module, name)
    raise AttributeError(f"module 'florg.run.compare' has no attribute {name!r}")
