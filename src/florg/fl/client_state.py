"""A client's state between rounds: in its Context, or on disk in the embedded simulation.

Flower's simulation engine keeps the Context of every simulated node in the driver process, so
whatever a ClientApp puts in ``context.state`` piles up there, one entry per client ever sampled:
florg's AdamW moments with ``train.reset_optimizer = false`` (about 0.2 MB per client for FLoRG on
MiniLM, 0.3 MB for FedIT: some 200-330 MB with 1000 clients), a method's own per-client factors
(FedSA-LoRA's local ``B``). With :data:`STATE_DIR_ENV` set, which
:func:`florg.fl.simulation.run_simulation_engine` does for the length of a run (a fresh folder,
removed at the end), such state goes to ``<dir>/<partition-id>/<key>.safetensors`` instead and
the driver's memory stays flat however many clients are sampled. Without it (a deployment: each
SuperNode holds its own Context only) it stays in ``context.state`` as before.

The files hold exactly what the record held (float32 arrays round-trip bit for bit), so a run
gives the same results either way.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import ArrayRecord, Context
from safetensors.torch import load_file, save_file

from .records import from_record, to_record

__all__ = ["STATE_DIR_ENV", "get_state", "put_state", "state_dir"]

#: environment variable naming the folder of the clients' state files (set by the embedded simulation)
STATE_DIR_ENV = "FLORG_CLIENT_STATE_DIR"


def state_dir() -> Path | None:
    """The folder of the clients' state files, or None (state in the Context)."""
    value = os.environ.get(STATE_DIR_ENV, "").strip()
    return Path(value) if value else None


def _file(folder: Path, pid: int, key: str) -> Path:
    return folder / str(int(pid)) / f"{key}.safetensors"


def get_state(context: Context, key: str, pid: int) -> ArrayRecord | None:
    """This client's record ``key`` from the last round it stored one, or None."""
    folder = state_dir()
    if folder is None:
        record = context.state.get(key)
        return record if isinstance(record, ArrayRecord) else None
    path = _file(folder, pid, key)
    if not path.is_file():
        return None
    return to_record(load_file(str(path)))


def put_state(context: Context, key: str, pid: int, record: ArrayRecord) -> None:
    """Keep ``record`` under ``key`` for this client's next round (written atomically on disk)."""
    folder = state_dir()
    if folder is None:
        context.state[key] = record
        return
    path = _file(folder, pid, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in from_record(record).items()}, str(tmp))
    os.replace(tmp, path)
