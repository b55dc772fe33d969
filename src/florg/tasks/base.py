"""The contract every task family implements: examples, model head, loss and metrics.

A *task family* is a kind of fine-tuning problem (sequence classification, extractive QA,
instruction tuning). A *task* is one data set of a family, named by ``data.task`` (e.g.
``wordnet``, ``glue/rte``, ``local:<path>``). Every federated method runs through the same
family interface, so a method never knows which family it trains:

* **examples**: :meth:`TaskFamily.load_data` returns the raw train/test splits as
  :class:`florg.data.TaskData`; their ``label`` column is what the non-IID partitioners stratify
  by (the class for classification, a documented derived label for the other families).
  :meth:`TaskFamily.encode` turns a split into model features; :meth:`TaskFamily.collate` pads
  a batch of them.
* **model head**: :meth:`TaskFamily.load_model` loads the ``AutoModelFor...`` of the family and
  :meth:`TaskFamily.head_modules` names the modules trained fully and FedAvg'd (``head/`` keys).
* **loss**: the model's own loss on a collated batch (``model(**batch).loss``), so the local
  training loop (:func:`florg.train.train_steps`) is the same for every family.
* **metrics**: :meth:`TaskFamily.evaluate` returns the family's metrics (``metrics``: primary
  first); the server writes them as ``test_<name>`` into every round's row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from florg.models import default_target_modules

if TYPE_CHECKING:
    from florg.config import RunConfig
    from florg.data import TaskData

__all__ = ["TaskFamily"]


class TaskFamily(ABC):
    """Base class of a task family (one module per family in ``florg.tasks``)."""

    #: the family's name (``classification``, ``extractive-qa``, ``instruction``)
    name: ClassVar[str]
    #: PEFT's ``task_type`` for adapters of this family (``SEQ_CLS``, ``QUESTION_ANS``, ``CAUSAL_LM``)
    peft_task_type: ClassVar[str]
    #: the metrics :meth:`evaluate` reports each round, the primary one first
    metrics: ClassVar[tuple[str, ...]]
    #: whether a larger primary metric is better (accuracy, F1: yes; loss: no)
    higher_is_better: ClassVar[bool] = True
    #: whether the encoded splits may be cached on disk (:mod:`florg.run.cache`): only if :meth:`encode`
    #: returns ``datasets.Dataset`` objects and :meth:`load_data`/:meth:`encode` leave no state on the
    #: family that :meth:`evaluate`/:meth:`finish` need (on a cache hit neither of them runs)
    cache_encoded: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    # ---- which data.task values belong to this family ------------------------------------------
    @classmethod
    @abstractmethod
    def accepts(cls, task: str) -> bool:
        """Whether ``data.task = task`` is a task of this family."""

    @classmethod
    @abstractmethod
    def task_forms(cls) -> list[str]:
        """The accepted forms of ``data.task`` for this family, for help texts and errors."""

    # ---- examples ------------------------------------------------------------------------------
    @abstractmethod
    def load_data(self) -> TaskData:
        """The raw train and test splits (``label`` = the partitioning label), capped as configured."""

    @abstractmethod
    def encode(self, ds: Any, tokenizer: Any, *, train: bool) -> Any:
        """Model features of a raw split: the training features (``train=True``), or whatever
        :meth:`evaluate` needs for the held-out split (``train=False``)."""

    @abstractmethod
    def collate(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Pad a list of training features into a batch the model takes (with its loss targets)."""

    # ---- model head ----------------------------------------------------------------------------
    @abstractmethod
    def load_model(self, data: TaskData, dtype: torch.dtype) -> tuple[Any, Any]:
        """``(model, tokenizer)`` for this family, with a fresh head sized for ``data``."""

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Modules trained fully and FedAvg'd besides the adapter (none by default)."""
        return []

    def target_modules(self, model: torch.nn.Module) -> list[str]:
        """The default adapted modules when ``model.target_modules`` is empty."""
        return default_target_modules(model)

    # ---- metrics -------------------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, model: torch.nn.Module, data: Any, *, batch_size: int, tokenizer: Any,
                 device: torch.device | None = None) -> dict[str, Any]:
        """The family's metrics of ``model`` on ``data`` (an :meth:`encode` result with ``train=False``)."""

    def client_score(self, result: dict[str, Any], label_counts: list[int]) -> float:
        """One number for a client's own model (personalised evaluation): the primary metric by default."""
        return float(result[self.primary_metric])

    def select(self, data: Any, indices: list[int]) -> Any:
        """The subset ``indices`` of an evaluation set (e.g. the personalised-evaluation subset)."""
        return data.select(indices)

    def size(self, data: Any) -> int:
        """Number of examples in an evaluation set."""
        return len(data)

    def finish(self, model: torch.nn.Module, experiment: Any, run_path: Path) -> dict[str, Any] | None:
        """Extra outputs written into the run directory after the last round (default: none).

        ``model`` holds the final global state and must hold it again on return. The returned
        dict (if any) is added to ``summary.json`` (e.g. ``rouge_l_before``/``rouge_l_after``).
        """
        return None
