"""Deprecated alias of :mod:`florg.study` (``florg study``), kept for one release.

The study moved to :mod:`florg.study.spec` (the study file, rows, configs), :mod:`florg.study.selection`
(validation scores, grids, choices) and :mod:`florg.study.execution` (running phases); import from there.
A public name of the old module is looked up there on first use (with a DeprecationWarning); this
module imports nothing of the study, nor :mod:`florg.fl`, until then.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_HOMES = ("florg.study.spec", "florg.study.selection", "florg.study.execution")


def __getattr__(name: str) -> Any:
    for home in _HOMES:
        module = importlib.import_module(home)
        if name in module.__all__:
            warnings.warn(f"florg.run.study is deprecated; import {name} from {home}", DeprecationWarning, stacklevel=2)
            return getattr(module, name)
    raise AttributeError(f"module 'florg.run.study' has no attribute {name!r}")
