"""Local training and evaluation: plain torch loops that read top to bottom.

The learning rate of a round is the server's decision (:func:`round_lr`) and arrives in the
round's config. By default the optimizer is created fresh every round (its state is reset);
``train.reset_optimizer = false`` makes the client carry it across rounds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from florg.config import TrainConfig

__all__ = ["round_lr", "make_optimizer", "train_steps", "evaluate", "cycle", "label_weighted_accuracy"]


def round_lr(train: TrainConfig, server_round: int) -> float:
    """Learning rate for ``server_round`` (1-based): constant, or cosine from ``lr`` to ``lr_min``."""
    if train.lr_schedule == "constant" or train.rounds <= 1:
        return train.lr
    progress = (server_round - 1) / (train.rounds - 1)
    return train.lr_min + 0.5 * (train.lr - train.lr_min) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: Iterable[nn.Parameter], train: TrainConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)


def cycle(loader: Iterable[Any]) -> Iterator[Any]:
    """Iterate over ``loader`` forever (a new epoch, with the loader's own shuffling, each pass)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the client's data loader is empty; every client needs at least one example")


def train_steps(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    steps: int,
) -> dict[str, float]:
    """Run ``steps`` optimizer steps; return the mean training loss and the number of examples seen."""
    model.train()
    total_loss, examples = 0.0, 0
    for _ in range(steps):
        batch = next(batches)
        out = model(**batch)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}; lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = int(batch["labels"].shape[0])
        total_loss += float(loss.detach()) * n
        examples += n
    return {"train_loss": total_loss / max(examples, 1), "examples": float(examples)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Mean cross-entropy and accuracy over ``loader`` (plus per-class ``class_correct``/``class_total``)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    class_correct: dict[int, int] = {}
    class_total: dict[int, int] = {}
    for batch in loader:
        out = model(**batch)
        labels = batch["labels"]
        n = int(labels.shape[0])
        total_loss += float(out.loss) * n
        hits = out.logits.argmax(-1) == labels
        correct += int(hits.sum())
        count += n
        for y, h in zip(labels.tolist(), hits.tolist()):
            class_total[y] = class_total.get(y, 0) + 1
            class_correct[y] = class_correct.get(y, 0) + int(h)
    if count == 0:
        raise ValueError("the evaluation set is empty")
    return {"loss": total_loss / count, "accuracy": correct / count, "examples": float(count),
            "class_correct": class_correct, "class_total": class_total}


def label_weighted_accuracy(result: dict[str, Any], label_counts: list[int]) -> float:
    """``sum_c pi(c) acc(c)``: per-class accuracies of ``result`` (from :func:`evaluate`) weighted by ``pi``.

    ``pi`` is ``label_counts`` normalised over the classes that occur in the evaluated set (a
    client's own label distribution, so the result is its expected accuracy on its own data when
    clients differ only in label proportions). Falls back to plain accuracy if none overlap.
    """
    total, correct = result["class_total"], result["class_correct"]
    weights = {c: float(n) for c, n in enumerate(label_counts) if n > 0 and total.get(c, 0) > 0}
    mass = sum(weights.values())
    if mass <= 0:
        return float(result["accuracy"])
    return sum(w * correct[c] / total[c] for c, w in weights.items()) / mass
