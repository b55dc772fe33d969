"""Local training: a plain torch loop that reads top to bottom.

The learning rate of a round is the server's decision (:func:`round_lr`) and arrives in the
round's config. By default the optimizer is created fresh every round (its state is reset);
``train.reset_optimizer = false`` makes the client carry it across rounds. The loss is the
model's own (``model(**batch).loss``) for every task family; evaluation is the family's
(:meth:`florg.tasks.base.TaskFamily.evaluate`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from florg.config import TrainConfig

__all__ = ["round_lr", "make_optimizer", "train_steps", "cycle"]


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
    device: torch.device | None = None,
) -> dict[str, float]:
    """Run ``steps`` optimizer steps; return the mean training loss and the number of examples seen."""
    model.train()
    total_loss, examples = 0.0, 0
    for _ in range(steps):
        batch = next(batches)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}; lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = int(batch["input_ids"].shape[0])
        total_loss += float(loss.detach()) * n
        examples += n
    return {"train_loss": total_loss / max(examples, 1), "examples": float(examples)}
