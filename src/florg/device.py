"""Devices and precision, one job: which device, which dtype, the mixed-precision context, and
what running out of device memory tells the user (docs/gpu.md).

* :func:`resolve_device` turns ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a
  ``torch.device``, with one-line errors naming the setting when the device is not there.
* :func:`check_dtype` refuses a base dtype the device cannot compute in (float16 on the CPU,
  bfloat16 on a GPU without bfloat16 arithmetic).
* :func:`autocast` is the mixed-precision context of a half-precision base model: the frozen
  weights are bfloat16/float16, the trainable tensors and the optimizer float32, and the matrix
  products run in the base dtype.
* :func:`memory_guard` turns running out of device memory into :class:`DeviceMemoryError`, one
  line that names the settings to change.

This module imports neither Flower nor ``datasets``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from florg.config import ConfigError

__all__ = [
    "DTYPES",
    "EVAL_MEMORY_FIX",
    "TRAIN_MEMORY_FIX",
    "DeviceMemoryError",
    "autocast",
    "base_dtype",
    "check_dtype",
    "memory_guard",
    "resolve_device",
]

#: ``model.dtype`` values and their torch dtypes
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HALF = (torch.bfloat16, torch.float16)

#: (setting named first, the fix) for running out of memory while training / evaluating
TRAIN_MEMORY_FIX = ("train.batch_size", "lower train.batch_size, raise train.grad_accum (the same update in smaller "
                                        "micro-batches) or set train.gradient_checkpointing=true")
EVAL_MEMORY_FIX = ("eval.batch_size", "lower eval.batch_size")


# --------------------------------------------------------------------------------------- devices
def resolve_device(spec: str, *, key: str = "config key 'train.device'") -> torch.device:
    """The ``torch.device`` of a device setting: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` is the first visible CUDA device when there is one, else the CPU. ``cuda`` is
    ``cuda:0`` of the *visible* devices (``CUDA_VISIBLE_DEVICES``; a simulated client sees only
    the GPU Ray gave it). Raises :class:`ConfigError` (one line, naming ``key``) when CUDA is
    asked for but absent, or the index is out of range.
    """
    spec = str(spec).strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    head, _, index = spec.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"{key}: {spec!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        build = "a CPU-only PyTorch build" if torch.version.cuda is None else f"PyTorch built for CUDA {torch.version.cuda}"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        raise ConfigError(f"{key}: {spec!r} but no CUDA device is available here ({build}{shown}); "
                          "set it to 'cpu' or 'auto'")
    n = torch.cuda.device_count()
    i = int(index or 0)
    if i >= n:
        raise ConfigError(f"{key}: {spec!r} but only {n} CUDA device(s) are visible (cuda:0..cuda:{n - 1}); "
                          "pick one of those")
    return torch.device("cuda", i)


def base_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``model.dtype`` value."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"config key 'model.dtype': {name!r} is not one of {', '.join(map(repr, DTYPES))}") from None


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse (:class:`ConfigError`) a base dtype that ``device`` cannot compute in."""
    if dtype is torch.float16 and device.type == "cpu":
        raise ConfigError("config key 'model.dtype': 'float16' needs a CUDA device (float16 training on the CPU is "
                          "slow, partly unsupported and needs a loss scaler that only CUDA has); on the CPU use "
                          "'bfloat16' or 'float32'")
    # GPU-only path
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"config key 'model.dtype': 'bfloat16' is not supported by {name} (compute capability "
                          f"{major}.{minor}; bfloat16 needs 8.0 or newer); use 'float16' or 'float32'")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for a half-precision base model (``dtype`` bfloat16/float16); a no-op for float32."""
    if dtype in _HALF:
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


class DeviceMemoryError(ConfigError):
    """The device ran out of memory; the message names the settings that reduce what a step needs."""


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "CUDA out of memory" in text)


@contextlib.contextmanager
def memory_guard(device: torch.device | None, what: str, fix: tuple[str, str]) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into one :class:`DeviceMemoryError` line.

    ``what`` says what ran (``training``, ``evaluation``); ``fix`` is ``(setting, advice)``, e.g.
    :data:`TRAIN_MEMORY_FIX`.
    """
    try:
        yield
    except Exception as exc:
        if not _is_oom(exc):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = str(device) if device is not None else "the device"
        if device is not None and device.type == "cuda":  # GPU-only path: free the failed step's blocks
            torch.cuda.empty_cache()
        setting, advice = fix
        raise DeviceMemoryError(f"config key '{setting}': out of memory on {where} during {what} "
                                f"({detail[:160]}); {advice}") from None
