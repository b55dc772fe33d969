"""Model, data, training and evaluation: plain PyTorch + transformers + PEFT (nothing Flower-specific).

The model is a sequence classifier wrapped in a FLoRG adapter with PEFT's own ``get_peft_model``
(``import florg`` registers the FLoRG PEFT type). The data is florg's embedded WordNet task
(WordNet glosses labelled with their lexicographer category, read offline from the system's
WordNet files), split IID over the SuperNodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import torch
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from florg import FLoRGConfig
from florg.data import load_task, partition_dataset
from florg.models import resolve_model


@lru_cache(maxsize=4)
def load_data(max_train: int, max_test: int, seed: int) -> Any:
    """The WordNet task (train and test splits), cached per process."""
    return load_task("wordnet", seed=seed, max_train_examples=max_train, max_test_examples=max_test)


@lru_cache(maxsize=64)
def load_partition(partition_id: int, num_partitions: int, max_train: int, max_test: int, seed: int) -> Any:
    """This SuperNode's IID share of the training split."""
    data = load_data(max_train, max_test, seed)
    return partition_dataset(data.train, num_partitions, "iid", seed=seed)[partition_id]


@lru_cache(maxsize=4)
def load_tokenizer(model_name: str) -> Any:
    return AutoTokenizer.from_pretrained(resolve_model(model_name))


def get_model(model_name: str, label_names: tuple[str, ...], rank: int, alpha: float, seed: int) -> torch.nn.Module:
    """A sequence classifier with a FLoRG adapter on query/value; the classifier head trains and is shared too."""
    torch.manual_seed(seed)  # the same fresh head on every SuperNode and on the server
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(model_name), num_labels=len(label_names),
        id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)},
    )
    config = FLoRGConfig(r=rank, lora_alpha=alpha, target_modules=["query", "value"], task_type="SEQ_CLS", seed=seed)
    return get_peft_model(model, config)


def _batches(dataset: Any, tokenizer: Any, batch_size: int, max_length: int,
             shuffle_seed: int | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
    order = list(range(len(dataset)))
    if shuffle_seed is not None:
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    for start in range(0, len(order), batch_size):
        rows = dataset.select(order[start:start + batch_size])
        enc = tokenizer(list(rows["text"]), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        yield enc, torch.tensor(rows["label"])


def train(model: torch.nn.Module, dataset: Any, tokenizer: Any, *, steps: int, batch_size: int, max_length: int,
          lr: float, head_lr: float, seed: int) -> float:
    """``steps`` AdamW steps over the local data (cycling); returns the mean training loss.

    The adapter (``florg_A``) trains at ``lr``, the classification head (``modules_to_save``) at ``head_lr``.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if "florg_A" in n], "lr": lr},
        {"params": [p for n, p in named if "florg_A" not in n], "lr": head_lr},
    ])
    model.train()
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        for enc, labels in _batches(dataset, tokenizer, batch_size, max_length, shuffle_seed=seed + epoch):
            loss = model(**enc, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if len(losses) == steps:
                break
        epoch += 1
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Any, tokenizer: Any, *, batch_size: int, max_length: int) -> tuple[float, float]:
    """``(loss, accuracy)`` on ``dataset``."""
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for enc, labels in _batches(dataset, tokenizer, batch_size, max_length):
        out = model(**enc, labels=labels)
        loss_sum += float(out.loss) * len(labels)
        correct += int((out.logits.argmax(-1) == labels).sum())
        total += len(labels)
    return loss_sum / total, correct / total
