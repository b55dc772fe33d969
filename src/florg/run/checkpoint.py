"""Server checkpoints for exact resume (no Flower here), stored without pickle.

After every round the server appends that round's metrics row (fsync'd) and then writes a
checkpoint: the global state (which is also the Procrustes reference), the round number,
cumulative byte counts, the strategy's state (node -> partition map, privacy accountant) and the
RNG states. On resume, metrics rows after the checkpoint's round (a round that was cut short)
are dropped, so no row is lost or duplicated.

Format: two files in the run directory, neither of which is ever unpickled.

* ``checkpoint-<round>-<digest>.safetensors``: every tensor (``state/<key>`` for the global
  state, ``rng/torch`` for torch's RNG state, ``rng/numpy_keys`` for NumPy's Mersenne-Twister
  key array), with the round in its safetensors metadata.
* ``checkpoint.json``: everything else (round, cumulative bytes, node -> partition map, the run
  config, the privacy accountant's ``state_dict()``, Python's ``random`` state, the scalar parts
  of NumPy's RNG state, the order of the global state's keys -- safetensors sorts them, and the
  order of the layers decides the order of floating-point sums in later rounds), plus the tensor
  file's name, size and SHA-256, and the SHA-256 of the JSON document itself.

Writing is atomic and the pair is always consistent: the tensor file is written under a
temporary name, fsync'd and renamed to its final name, which is new for every content (the
round and a digest are in it), so the tensor file of the current checkpoint is never replaced;
then ``checkpoint.json`` is written the same way and renamed over the old one. That rename is
the commit point: a crash before it leaves the previous pair intact, a crash after it the new
one. Tensor files that no ``checkpoint.json`` refers to any more are removed afterwards.

Loading reads JSON and safetensors only. A pickle checkpoint (``checkpoint.pt``, written by
florg before this format, or crafted to run code when unpickled), a damaged or edited
``checkpoint.json``, or a tensor file that does not match it is refused with a
:class:`CheckpointError` naming the file and the fix; nothing in the file is executed. The
digests detect damage and mismatched files; they are not a signature (anyone who can write the
run directory can write a consistent pair, but such a pair is only data).

Exact resume holds for client-stateless runs (the default: the optimizer is reset each round);
client-side state kept in Flower's ``Context.state`` (``train.reset_optimizer = false``) does
not survive a crash of the simulation and restarts empty.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

__all__ = [
    "CHECKPOINT_NAME",
    "LEGACY_CHECKPOINT_NAME",
    "CheckpointError",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.json"  #: the commit record; names the tensor file it goes with
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"  #: pickle checkpoints of older florg versions: refused
FORMAT = "florg-checkpoint"
VERSION = 1
_TENSOR_FILE = re.compile(r"checkpoint-\d{6,}-[0-9a-f]{16}\.safetensors")
_STATE, _RNG_TORCH, _RNG_NUMPY = "state/", "rng/torch", "rng/numpy_keys"
_START_OVER = "start the run again without --resume (or restore the run directory from a backup)"


class CheckpointError(ValueError):
    """A checkpoint that florg refuses to load; the message names the file and the fix."""


# ---------------------------------------------------------------------------------- saving
def save_checkpoint(run_dir: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` plus the current RNG states as a checkpoint in ``run_dir``.

    ``payload`` holds ``round`` (int), ``state`` (``{key: tensor}``), ``cumulative`` (byte
    counters), ``node_partition`` (``{node id: partition id}``), ``config`` (a dict) and
    ``privacy`` (the accountant's ``state_dict()`` or ``None``). Returns the path of
    ``checkpoint.json``.
    """
    folder = Path(run_dir)
    rnd = int(payload["round"])
    tensors, rng_meta = _tensors(payload.get("state", {}))
    blob = save_tensors(tensors, metadata={"format": FORMAT, "round": str(rnd)})
    digest = hashlib.sha256(blob).hexdigest()
    tensor_name = f"checkpoint-{rnd:06d}-{digest[:16]}.safetensors"
    body = {
        "format": FORMAT,
        "version": VERSION,
        "round": rnd,
        "tensors": {"file": tensor_name, "bytes": len(blob), "sha256": digest},
        "state_keys": list(payload.get("state", {})),  # safetensors sorts its keys; the order matters (sums)
        "cumulative": {str(k): int(v) for k, v in dict(payload.get("cumulative", {})).items()},
        "node_partition": {str(int(k)): int(v) for k, v in dict(payload.get("node_partition", {})).items()},
        "config": payload.get("config"),
        "privacy": payload.get("privacy"),
        "rng": rng_meta,
    }
    body["sha256"] = _body_digest(body)
    text = json.dumps(_json_safe(body), indent=1, sort_keys=True, allow_nan=False) + "\n"
    _write_atomic(folder / tensor_name, blob)  # a new name: the current pair stays intact
    _write_atomic(folder / CHECKPOINT_NAME, text.encode())  # the commit point
    _fsync_dir(folder)
    for stale in folder.glob("checkpoint-*.safetensors"):
        if stale.name != tensor_name:
            stale.unlink(missing_ok=True)
    return folder / CHECKPOINT_NAME


def _tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor to store (global state + RNG arrays) and the JSON part of the RNG states."""
    out = {_STATE + k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    out[_RNG_TORCH] = torch.get_rng_state().clone()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out[_RNG_NUMPY] = torch.from_numpy(np.asarray(keys, dtype=np.int64).copy())
    version, internal, gauss_next = random.getstate()
    meta = {
        "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    return out, meta


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. no directory handles on this platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_safe(value: Any) -> Any:
    """Plain JSON types only (NumPy scalars and tuples converted); non-finite floats are an error."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            raise ValueError(f"checkpoint: cannot store the non-finite number {value!r}")
        return float(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"checkpoint: cannot store a value of type {type(value).__name__} in JSON")


def _body_digest(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``body`` without its own ``sha256`` entry."""
    plain = _json_safe({k: v for k, v in body.items() if k != "sha256"})
    return hashlib.sha256(json.dumps(plain, sort_keys=True, allow_nan=False).encode()).hexdigest()


# --------------------------------------------------------------------------------- loading
def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint in ``run_dir`` (``None`` if there is none), after checking it.

    Returns ``{"round", "state", "cumulative", "node_partition", "config", "privacy", "rng"}``.
    Raises :class:`CheckpointError` for a pickle checkpoint (``checkpoint.pt``), a damaged or
    edited ``checkpoint.json``, or a missing or mismatched tensor file. Never unpickles.
    """
    folder = Path(run_dir)
    legacy = folder / LEGACY_CHECKPOINT_NAME
    if legacy.exists():
        raise CheckpointError(
            f"{legacy} is a pickle checkpoint (older florg versions wrote them; a crafted one runs code when it "
            f"is unpickled) and florg does not unpickle checkpoints, so it was not read. Remove it and {_START_OVER}."
        )
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        return None
    body = _read_body(path)
    tensors = _read_tensors(folder, path, body)
    rng = body["rng"]
    return {
        "round": body["round"],
        "state": {key: tensors[_STATE + key] for key in body["state_keys"]},  # in the saved order
        "cumulative": dict(body["cumulative"]),
        "node_partition": {int(k): int(v) for k, v in body["node_partition"].items()},
        "config": body.get("config"),
        "privacy": body.get("privacy"),
        "rng": {
            "python": (rng["python"]["version"], tuple(rng["python"]["internal"]), rng["python"]["gauss_next"]),
            "numpy": (rng["numpy"]["kind"], tensors[_RNG_NUMPY].numpy().astype(np.uint32), rng["numpy"]["pos"],
                      rng["numpy"]["has_gauss"], rng["numpy"]["cached_gaussian"]),
            "torch": tensors[_RNG_TORCH],
        },
    }


def _bad(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; the checkpoint is damaged or was modified. Nothing was loaded; "
                           f"{_START_OVER}.")


def _read_body(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"not a readable JSON document ({exc})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise _bad(path, f"not a florg checkpoint (no \"format\": \"{FORMAT}\")")
    if body.get("version") != VERSION:
        raise _bad(path, f"checkpoint format version {body.get('version')!r}, this florg reads version {VERSION}")
    if body.get("sha256") != _body_digest(body):
        raise _bad(path, "its content does not match its recorded SHA-256")
    try:
        _check_schema(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(path, f"unexpected content ({exc})") from None
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _check_schema(body: dict[str, Any]) -> None:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ValueError(what)

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    need(is_int(body["round"]) and body["round"] >= 0, "round must be a non-negative integer")
    t = body["tensors"]
    need(isinstance(t, dict) and isinstance(t["file"], str) and _TENSOR_FILE.fullmatch(t["file"]) is not None,
         "tensors.file must name a checkpoint-<round>-<digest>.safetensors file in the run directory")
    need(is_int(t["bytes"]) and isinstance(t["sha256"], str), "tensors.bytes / tensors.sha256")
    keys = body["state_keys"]
    need(isinstance(keys, list) and all(isinstance(k, str) for k in keys) and len(set(keys)) == len(keys),
         "state_keys must list distinct names")
    need(isinstance(body["cumulative"], dict) and all(is_int(v) for v in body["cumulative"].values()),
         "cumulative must map names to integers")
    need(isinstance(body["node_partition"], dict) and all(k.isdigit() and is_int(v) for k, v in
                                                          body["node_partition"].items()),
         "node_partition must map node ids to partition ids")
    need(body.get("privacy") is None or isinstance(body["privacy"], dict), "privacy must be an object or null")
    py, npy = body["rng"]["python"], body["rng"]["numpy"]
    need(is_int(py["version"]) and isinstance(py["internal"], list) and all(is_int(x) for x in py["internal"]),
         "rng.python")
    need(py["gauss_next"] is None or isinstance(py["gauss_next"], float), "rng.python.gauss_next")
    need(isinstance(npy["kind"], str) and is_int(npy["pos"]) and is_int(npy["has_gauss"])
         and isinstance(npy["cached_gaussian"], (int, float)), "rng.numpy")


def _read_tensors(folder: Path, path: Path, body: dict[str, Any]) -> dict[str, torch.Tensor]:
    info = body["tensors"]
    tensor_path = folder / info["file"]
    try:
        blob = tensor_path.read_bytes()
    except OSError:
        raise _bad(path, f"the tensor file {tensor_path.name} it refers to is missing") from None
    if len(blob) != info["bytes"] or hashlib.sha256(blob).hexdigest() != info["sha256"]:
        raise _bad(tensor_path, f"this tensor file does not match {path.name} (size or SHA-256 differs)")
    try:
        tensors = load_tensors(blob)
        meta = _safetensors_metadata(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise _bad(tensor_path, f"not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("round") != str(body["round"]):
        raise _bad(tensor_path, f"its round ({meta.get('round')}) differs from that of {path.name} ({body['round']})")
    for key in (_RNG_TORCH, _RNG_NUMPY):
        if key not in tensors:
            raise _bad(tensor_path, f"the tensor {key!r} is missing")
    if {k for k in tensors if k.startswith(_STATE)} != {_STATE + k for k in body["state_keys"]}:
        raise _bad(tensor_path, f"its state tensors differ from those listed in {path.name}")
    return tensors


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (its JSON header)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def restore_rng(data: dict[str, Any]) -> None:
    """Set Python's, NumPy's and torch's global RNGs to the states saved in a checkpoint."""
    rng = data.get("rng")
    if not rng:
        return
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
