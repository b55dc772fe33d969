"""Local training: a plain torch loop that reads top to bottom, on the CPU or a GPU.

The learning rate of a round is the server's decision (:func:`round_lr`) and arrives in the
round's config. By default the optimizer is created fresh every round (its state is reset);
``train.reset_optimizer = false`` makes the client carry it across rounds. The loss is the
model's own (``model(**batch).loss``) for every task family; evaluation is the family's
(:meth:`florg.tasks.base.TaskFamily.evaluate`).

Devices and precision live in :mod:`florg.device` (device, dtype, autocast, the memory guard);
:func:`train_steps` optionally splits each batch into ``train.grad_accum`` micro-batches whose
gradients add up to the whole batch's (same update, less memory), and scales float16 losses with a
``GradScaler`` (GPU only).

This module imports neither Flower nor ``datasets`` (the GPU check uses it on its own).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from florg.config import ConfigError, TrainConfig
from florg.device import TRAIN_MEMORY_FIX, autocast, memory_guard

__all__ = [
    "cycle",
    "loss_items",
    "local_steps",
    "make_optimizer",
    "param_groups",
    "round_head_lr",
    "round_lr",
    "set_gradient_checkpointing",
    "split_batch",
    "train_steps",
]

#: the ignore index of transformers' token-level losses
IGNORE_INDEX = -100


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Switch activation checkpointing of the (PEFT-wrapped) transformers model on or off.

    Non-reentrant checkpointing (``use_reentrant=False``): no input needs ``requires_grad`` and the
    RNG state is replayed, so the update equals the one without checkpointing.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if enabled == bool(base.is_activation_checkpointing):
        return
    if not enabled:
        base.activation_checkpointing_disable()
        return
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"config key 'train.gradient_checkpointing': {type(base).__name__} does not support "
                          "gradient checkpointing; set it to false (and lower train.batch_size or raise "
                          "train.grad_accum to save memory)")
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


# --------------------------------------------------------------------------------------- optimisation
def round_lr(train: TrainConfig, server_round: int) -> float:
    """Learning rate for ``server_round`` (1-based): constant, or cosine from ``lr`` towards ``lr_min``.

    Cosine: ``lr_min + (lr - lr_min) (1 + cos(pi (t - 1) / R)) / 2`` for round ``t`` of ``R``: round 1
    trains at ``lr`` and every round, the last included, at more than ``lr_min`` (the schedule
    would reach ``lr_min`` only at round ``R + 1``), so no round is wasted at ``lr_min = 0``.
    """
    if train.lr_schedule == "constant":
        return train.lr
    progress = (server_round - 1) / train.rounds
    return train.lr_min + 0.5 * (train.lr - train.lr_min) * (1.0 + math.cos(math.pi * progress))


def round_head_lr(train: TrainConfig, server_round: int) -> float:
    """The head's learning rate for ``server_round``: ``train.head_lr`` (0 = ``train.lr``) on ``train.lr``'s schedule.

    The schedule is the adapter's, scaled by ``head_lr / lr``, so both follow one curve.
    """
    if train.head_lr <= 0:
        return round_lr(train, server_round)
    return round_lr(train, server_round) * (train.head_lr / train.lr)


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]], lr: float, head_lr: float | None, is_adapter: Callable[[str], bool]
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: ``[adapter at lr, head at head_lr]`` (groups without parameters dropped).

    ``is_adapter(name)`` says which trainable parameters are the adapter's; every other trainable
    parameter (the classification head, ``modules_to_save``) trains at ``head_lr`` (``None`` = ``lr``).
    """
    adapter, head = [], []
    for name, p in named:
        if p.requires_grad:
            (adapter if is_adapter(name) else head).append(p)
    groups = [{"params": adapter, "lr": lr, "name": "adapter"},
              {"params": head, "lr": lr if head_lr is None else head_lr, "name": "head"}]
    return [g for g in groups if g["params"]]


def make_optimizer(params: Iterable[Any], train: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params``: parameters (every trainable one at ``lr``) or :func:`param_groups`."""
    items = list(params)
    if items and isinstance(items[0], dict):
        groups = items
    else:
        groups = [p for p in items if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=train.weight_decay)


def local_steps(train: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of one client round: ``train.local_steps``, or ``train.local_epochs`` whole passes."""
    if train.local_epochs > 0:
        return train.local_epochs * max(1, batches_per_epoch)
    return train.local_steps


def cycle(loader: Iterable[Any]) -> Iterator[Any]:
    """Iterate over ``loader`` forever (a new epoch, with the loader's own shuffling, each pass)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the client's data loader is empty; every client needs at least one example")


def loss_items(batch: dict[str, torch.Tensor]) -> int:
    """How many terms the model's mean loss averages over in ``batch``.

    Token-level labels (2-D, causal LM): the targets that are not ``-100`` after transformers'
    one-token shift (``labels[:, 1:]``). Anything else (class labels, answer spans): the rows.
    """
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.ndim >= 2:
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    return int(next(iter(batch.values())).shape[0])


def split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut into ``parts`` micro-batches of consecutive rows (sizes differ by at most one).

    Right padding that no row of a micro-batch needs (``attention_mask`` all zero at the end) is
    trimmed from every tensor with the sequence length.
    """
    rows = int(next(iter(batch.values())).shape[0])
    sizes = [len(c) for c in torch.arange(rows).tensor_split(min(parts, rows))]
    out, start = [], 0
    for size in sizes:
        mb = {k: v[start:start + size] for k, v in batch.items()}
        start += size
        mask = mb.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            seq = int(mask.shape[1])
            used = mask.any(dim=0).nonzero()
            keep = int(used[-1]) + 1 if used.numel() else seq
            if keep < seq:
                mb = {k: (v[:, :keep] if v.ndim >= 2 and v.shape[1] == seq else v) for k, v in mb.items()}
        out.append(mb)
    return out


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss.item()}; lower train.lr")


def train_steps(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    steps: int,
    device: torch.device | None = None,
    *,
    grad_accum: int = 1,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Run ``steps`` optimizer steps; return the mean training loss and the number of examples seen.

    ``grad_accum > 1`` splits every batch into that many micro-batches; each micro-batch's loss
    is weighted by its share of the batch's loss terms (:func:`loss_items`), so the accumulated
    gradient is the whole batch's. ``dtype`` is the base model's dtype: bfloat16/float16 run the
    forward under :func:`autocast`; float16 on a GPU also scales the loss (``GradScaler``).
    Running out of device memory raises :class:`DeviceMemoryError`.
    """
    model.train()
    total_loss, examples = 0.0, 0
    dev = device if device is not None else next(model.parameters()).device
    scaler = None
    if dtype is torch.float16 and dev.type == "cuda":  # GPU-only path
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    with memory_guard(dev, "training", TRAIN_MEMORY_FIX):
        for _ in range(steps):
            batch = next(batches)
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            if grad_accum == 1:
                with autocast(dev, dtype):
                    loss = model(**batch).loss
                _check_finite(loss)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss = float(loss.detach())
            else:
                micro = split_batch(batch, grad_accum)
                counts = [loss_items(mb) for mb in micro]
                total = sum(counts)
                step_loss = 0.0
                for mb, count in zip(micro, counts, strict=True):
                    if count == 0:
                        continue  # nothing to learn from (all targets ignored)
                    with autocast(dev, dtype):
                        loss = model(**mb).loss
                    _check_finite(loss)
                    part = loss * (count / total)
                    (scaler.scale(part) if scaler is not None else part).backward()
                    step_loss += float(part.detach())
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            n = int(batch["input_ids"].shape[0])
            total_loss += step_loss * n
            examples += n
    return {"train_loss": total_loss / max(examples, 1), "examples": float(examples)}
