"""Instruction data: florg's loaders (WordNet definitions, or your own JSONL), split IID over the SuperNodes.

Rows are rendered with the tokenizer's chat template (Alpaca's prompt without one) and the loss
covers the response tokens only (``labels`` are -100 on the prompt).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from florg.data import partition_dataset
from florg.data.instruct import load_instruct_task
from florg.tasks.instruction import encode_instructions, make_lm_collate

__all__ = ["load_data", "load_partition", "make_lm_collate", "tokenized"]


@lru_cache(maxsize=4)
def load_data(name: str, max_train: int, max_test: int, seed: int) -> Any:
    """Train and test splits of raw instruction rows (cached per process)."""
    return load_instruct_task(name, seed=seed, max_train_examples=max_train, max_test_examples=max_test)


def load_partition(partition_id: int, num_partitions: int, data: Any, seed: int) -> Any:
    """This SuperNode's IID share of the training rows."""
    return partition_dataset(data.train, num_partitions, "iid", seed=seed)[partition_id]


def tokenized(rows: Any, tokenizer: Any, max_length: int) -> Any:
    """``input_ids``, ``attention_mask`` and ``labels`` (prompt masked) for every row."""
    return encode_instructions(rows, tokenizer, max_length)
