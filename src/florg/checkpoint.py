"""Server checkpoints for exact resume (no Flower here).

After every round the server appends that round's metrics row (fsync'd) and then writes
``checkpoint.pt`` atomically (temporary file, then rename): the global state (which is also the
Procrustes reference), the round number, cumulative byte counts, the strategy's state and the
RNG states. On resume, metrics rows after the checkpoint's round (a round that was cut short)
are dropped, so no row is lost or duplicated.

Exact resume holds for client-stateless runs (the default: the optimizer is reset each round);
client-side state kept in Flower's ``Context.state`` (``train.reset_optimizer = false``) does
not survive a crash of the simulation and restarts empty.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint", "restore_rng"]

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(run_dir: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (plus RNG states) to ``<run_dir>/checkpoint.pt``."""
    path = Path(run_dir) / CHECKPOINT_NAME
    data = dict(payload)
    data["rng"] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return torch.load(path, weights_only=False)


def restore_rng(data: dict[str, Any]) -> None:
    rng = data.get("rng")
    if not rng:
        return
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
