"""Splitting a labelled dataset: a stratified, seed-fixed hold-out, a seeded subset, and a column as a list."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["column_values", "random_subset", "stratified_holdout"]


def column_values(ds: Any, name: str) -> list:
    """All values of one column as a Python list (fast; honours an indices mapping)."""
    return ds.select_columns([name])[:][name] if len(ds) else []


def stratified_holdout(ds: Any, seed: int, fraction: float, size: int | None = None) -> tuple[Any, Any]:
    """``(rest, held_out)``: a seed-fixed hold-out of ``fraction`` (or ``size`` examples), stratified by ``label``."""
    return _holdout(ds, seed, fraction, size)


def _holdout(ds: Any, seed: int, test_fraction: float, test_size: int | None) -> tuple[Any, Any]:
    """Seed-fixed hold-out, stratified by label (largest-remainder allocation per class).

    Implemented with NumPy on the label column: ``datasets``' own stratified split walks the
    rows in Python and takes seconds on WordNet.
    """
    # lazy: numpy: florg predict's argument check imports florg.data (test_predict_startup.py)
    import numpy as np

    n = len(ds)
    n_test = int(test_size) if test_size is not None else int(round(float(test_fraction) * n))
    if n_test < 1 or n_test >= n:
        raise ValueError(
            f"test split of {n_test} examples out of {n} is not possible; "
            "adjust test_fraction (0 < f < 1) or test_size"
        )
    labels = np.asarray(column_values(ds, "label"))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n_test / n)
    alloc = np.floor(exact).astype(int)
    order = np.argsort(-(exact - alloc), kind="stable")
    alloc[order[: n_test - int(alloc.sum())]] += 1
    test_parts = []
    for c, a in zip(classes, alloc, strict=True):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_parts.append(idx[:a])
    test_idx = np.concatenate(test_parts)
    mask = np.ones(n, dtype=bool)
    mask[test_idx] = False
    train_idx = np.flatnonzero(mask)
    rng.shuffle(test_idx)
    rng.shuffle(train_idx)
    return _select(ds, train_idx), _select(ds, test_idx)


def _select(ds: Any, idx: Sequence[int] | np.ndarray) -> Any:
    """``ds.select`` with a cheap fingerprint (the default one hashes the index list slowly)."""
    # lazy: numpy: florg predict's argument check imports florg.data (test_predict_startup.py)
    import numpy as np

    arr = np.asarray(idx, dtype=np.int64)
    fp = hashlib.sha256(ds._fingerprint.encode() + arr.tobytes()).hexdigest()[:16]
    return ds.select(arr, new_fingerprint=fp)


def random_subset(ds: Any, n: int | None, seed: int) -> Any:
    """A seed-fixed random subset of ``n`` examples (all of ``ds`` when ``n`` is None or not smaller)."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def _check_split_args(
    test_fraction: float, test_size: int | None, max_train: int | None, max_test: int | None
) -> None:
    if test_size is None and not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if test_size is not None and int(test_size) < 1:
        raise ValueError(f"test_size must be >= 1, got {test_size}")
    for key, v in (("data.max_train_examples", max_train), ("data.max_test_examples", max_test)):
        if v is not None and int(v) < 1:
            raise ValueError(f"{key} must be >= 1 (or unset for no cap), got {v}")
