"""florg.data: offline-first text classification tasks and their federated partitioning.

* :func:`load_task` -- ``wordnet`` (default, offline), ``wordnet-nouns`` (12 balanced classes,
  offline), ``glue/<task>`` (local files or Hub),
  ``local:<path>``; returns a :class:`TaskData` with train/test splits.
* :func:`load_wordnet` -- WordNet gloss -> lexicographer category.
* :func:`partition_dataset` -- IID / Dirichlet / pathological client splits via Flower
  Datasets partitioners, plus :func:`partition_stats` / :func:`format_partition_stats`.

Extractive-QA data lives in :mod:`florg.data.squad` (SQuAD v1.1 JSON files or the Hub copy) and
:mod:`florg.data.wordnet_qa` (the embedded WordNet QA task).
"""

from .catalog import GLUE_HUB_ID, GLUE_TASKS, DataUnavailableError, TaskData, available_tasks, load_local, load_task
from .partition import PARTITION_SCHEMES, format_partition_stats, partition_dataset, partition_stats
from .wordnet import (
    DEFAULT_CLASSES,
    DEFAULT_WORDNET_DIR,
    NOUN_CLASSES,
    NOUN_PER_CLASS,
    WORDNET_LEXNAMES,
    WordNetNotFoundError,
    clean_gloss,
    load_wordnet,
)

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_WORDNET_DIR",
    "GLUE_HUB_ID",
    "GLUE_TASKS",
    "NOUN_CLASSES",
    "NOUN_PER_CLASS",
    "PARTITION_SCHEMES",
    "WORDNET_LEXNAMES",
    "DataUnavailableError",
    "TaskData",
    "WordNetNotFoundError",
    "available_tasks",
    "clean_gloss",
    "format_partition_stats",
    "load_local",
    "load_task",
    "load_wordnet",
    "partition_dataset",
    "partition_stats",
]
