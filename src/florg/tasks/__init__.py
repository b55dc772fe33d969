"""Task families: one module each behind one contract (:class:`florg.tasks.base.TaskFamily`).

``FAMILIES`` lists them in the order ``data.task`` is matched against them; classification
is last, as it also takes local files and paths. :func:`get_family` picks the family of a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import TaskFamily
from .classification import ClassificationFamily
from .extractive_qa import ExtractiveQAFamily
from .instruction import InstructionFamily

if TYPE_CHECKING:
    from florg.config import RunConfig

#: every task family; the first whose ``accepts`` is true owns a ``data.task`` value
FAMILIES: list[type[TaskFamily]] = [ExtractiveQAFamily, InstructionFamily, ClassificationFamily]


def family_class(task: str) -> type[TaskFamily]:
    """The family that owns ``data.task = task``."""
    for cls in FAMILIES:
        if cls.accepts(task):
            return cls
    raise ValueError(f"no task family accepts data.task={task!r}")  # unreachable: classification accepts all


def get_family(cfg: RunConfig) -> TaskFamily:
    """The task family of ``cfg`` (from ``data.task``)."""
    return family_class(cfg.data.task)(cfg)


def task_forms() -> list[str]:
    """Every accepted form of ``data.task``, family by family."""
    return [form for cls in FAMILIES for form in cls.task_forms()]


__all__ = [
    "FAMILIES",
    "ClassificationFamily",
    "ExtractiveQAFamily",
    "InstructionFamily",
    "TaskFamily",
    "family_class",
    "get_family",
    "task_forms",
]
