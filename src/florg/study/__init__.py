"""The study layer: comparisons of many runs, above the runtime (:mod:`florg.run`, :mod:`florg.fl`).

* :mod:`florg.study.compare`   -- ``florg compare``: every method on one configuration
* :mod:`florg.study.spec`      -- ``florg study``: the study file (format), its rows, sweep points and run configs
* :mod:`florg.study.selection` -- validation scores, lr grids and their extension, the choices, each phase's plan
* :mod:`florg.study.execution` -- running a phase: one run at a time, lock files, wall and CPU time
* :mod:`florg.study.report`    -- the generated part of a study's results folder
* :mod:`florg.study.tables`    -- the tables of a comparison (shared by compare and study)
* :mod:`florg.study.stats`     -- per-seed summaries, t intervals, paired tests, bytes to target

Nothing is imported with the package itself (``florg --help`` stays fast); the study's main
functions are importable from here and load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PHASES": "florg.study.spec",
    "Study": "florg.study.spec",
    "StudyError": "florg.study.spec",
    "StudyRow": "florg.study.spec",
    "StudySpec": "florg.study.spec",
    "load_study": "florg.study.spec",
    "plan_phase": "florg.study.selection",
    "planned_counts": "florg.study.selection",
    "row_tuning": "florg.study.selection",
    "select_florg_best": "florg.study.selection",
    "select_lrs": "florg.study.selection",
    "measured_costs": "florg.study.execution",
    "run_phase": "florg.study.execution",
    "write_reports": "florg.study.execution",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'florg.study' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
