"""Data loaders over encoded datasets: per-batch padding (:func:`make_collate`) and seeded shuffling
(:func:`make_loader`). Encoding is the task family's (:meth:`florg.tasks.base.TaskFamily.encode`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["make_collate", "make_loader"]


class _Columns(torch.utils.data.Dataset):
    """Encoded columns held as Python lists (fast per-example access for the DataLoader)."""

    def __init__(self, ds: Any) -> None:
        self.keys = list(ds.column_names)
        if "input_ids" not in self.keys:
            raise ValueError(
                f"make_loader needs an encoded dataset (a task family's encode); columns: {', '.join(ds.column_names)}"
            )
        self.cols = ds[:] if len(ds) else {k: [] for k in self.keys}
        self.n = len(ds)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: self.cols[k][i] for k in self.keys}


def make_collate(pad_token_id: int = 0) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Collate function: right-pad a list of encoded examples to the longest one.

    ``input_ids`` are padded with ``pad_token_id``; ``attention_mask``/``token_type_ids`` with 0;
    ``labels`` become a ``long`` tensor.
    """

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(ex["input_ids"]) for ex in batch)
        out: dict[str, torch.Tensor] = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key not in batch[0]:
                continue
            fill = pad_token_id if key == "input_ids" else 0
            rows = [list(ex[key]) + [fill] * (longest - len(ex[key])) for ex in batch]
            out[key] = torch.tensor(rows, dtype=torch.long)
        out["labels"] = torch.tensor([int(ex["labels"]) for ex in batch], dtype=torch.long)
        return out

    return collate


def make_loader(
    ds: Any,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    *,
    pad_token_id: int | None = None,
    tokenizer: Any = None,
    drop_last: bool = False,
    collate_fn: Any = None,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over an encoded dataset with per-batch padding.

    Shuffling draws from a ``torch.Generator`` seeded with ``seed``, so two loaders built with
    the same seed yield the same batches (epoch after epoch). ``collate_fn`` pads a batch (a task
    family's :meth:`~florg.tasks.base.TaskFamily.collate`); without it, the classification
    collate of :func:`make_collate` is used: pass the tokenizer (or its ``pad_token_id``), as
    causal-LM classifiers locate the last real token through the pad id. Without either, input
    ids are padded with 0 (BERT's ``[PAD]``).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return torch.utils.data.DataLoader(
        _Columns(ds),
        batch_size=int(batch_size),
        shuffle=bool(shuffle),
        generator=generator,
        collate_fn=collate_fn or make_collate(0 if pad_token_id is None else int(pad_token_id)),
        drop_last=drop_last,
        num_workers=0,
    )
