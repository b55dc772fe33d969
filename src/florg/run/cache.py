"""On-disk cache of what building an experiment computes, for processes that build it again.

A Flower deployment starts a fresh ClientApp process for every message (Flower 1.42's
SuperNode runs one ``flwr-clientapp`` process per task; nothing of a ClientApp outlives its
reply), so without a cache every client rebuilds the model and the data every round: loading
and partitioning the data set, tokenising it, and for FLoRG drawing the bases (a QR per layer).
With ``cache.enabled`` (the default) the first process stores, and every later one loads:

* **data** (``data-<hash>/``): the raw splits, every client's encoded partition, the encoded
  test and validation splits as Arrow files (``datasets``' ``save_to_disk``; loading them maps
  the files into memory instead of reading them), plus ``meta.json`` (class names, the
  partition summary). Keyed by a hash of everything the data depends on: the seed, the
  ``data.*`` settings, the model name (its tokenizer) and ``model.max_length``, the task family,
  the size and modification time of the local files the data and the tokenizer are read from,
  the versions of florg, ``datasets``, ``transformers`` and ``tokenizers``, and the source code
  of florg's data, task and model modules.
* **bases** (``bases-<hash>.safetensors``): FLoRG's ``(L, R)`` per layer in the base dtype
  (:mod:`florg.adapters.florg.stored_bases`), keyed by the seed, the model name, its dtype and the
  adapted modules, the torch version and the source of the draw (``core/bases.py``) only, so that
  ``florg predict`` finds the file of a run made before an unrelated code change (each tensor in
  the file is named by its seed, layer, shape and dtype as well).

The model's own weights are read from safetensors checkpoints already (the Hugging Face cache,
or florg's converted copy for ``smollm2``/GGUF files), memory-mapped by ``from_pretrained``.

A family opts in to the data cache with ``cache_encoded = True``
(:attr:`florg.tasks.base.TaskFamily.cache_encoded`): its ``encode`` must return
``datasets.Dataset`` objects and ``load_data``/``encode`` must leave no state on the family that
``evaluate``/``finish`` need (on a cache hit neither runs). Entries are written to a temporary
folder and renamed into place, so concurrent processes never read a half-written entry; an entry
that cannot be read is rebuilt. The folder is ``cache.dir``, else ``$FLORG_CACHE/experiments``,
else ``~/.cache/florg/experiments``; deleting it is always safe.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
from datasets import Dataset, load_from_disk

import florg
from florg.data import TaskData
from florg.models import florg_cache_dir

if TYPE_CHECKING:
    from florg.config import RunConfig
    from florg.tasks import TaskFamily

__all__ = ["CACHE_FORMAT", "CachedData", "DataCache", "bases_path", "cache_root"]

log = logging.getLogger(__name__)

#: bump when the layout of a cache entry changes
CACHE_FORMAT = 1
#: the source a drawn basis depends on (:func:`florg.core.make_bases`)
_BASES_SOURCE = "core/bases.py"
_SOURCES = ("data", "tasks", "models.py", "run/cache.py", "run/experiment.py", "core/seeds.py", "core/bases.py")


def cache_root(cfg: RunConfig) -> Path:
    """The cache folder: ``cache.dir``, else ``$FLORG_CACHE/experiments``, else ``~/.cache/florg/experiments``."""
    if cfg.cache.dir:
        return Path(cfg.cache.dir).expanduser()
    return florg_cache_dir() / "experiments"


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """SHA-256 over the source files that shape the data (a code change invalidates the cache)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in _SOURCES:
        path = root / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"florg": florg.__version__}
    for pkg in ("datasets", "transformers", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def _local_files(cfg: RunConfig) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of every local file the data and the tokenizer come from.

    The data folder (``data.data_dir``), a path in ``data.task`` (``local:<path>``,
    ``instruct:<path>``, a bare path) and a model folder (its tokenizer): editing any of them
    changes the key. Hub ids and the built-in tasks have no local files here (their versions are
    part of the key through the library versions and florg's code).
    """
    candidates = [cfg.data.data_dir, cfg.data.task.split(":", 1)[-1] if ":" in cfg.data.task else cfg.data.task,
                  cfg.model.name]
    out: list[list[Any]] = []
    for value in candidates:
        if not value or value.startswith("hub:"):
            continue
        path = Path(value).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.endswith((".safetensors", ".bin")))
        else:
            continue
        for f in files:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=1)
def _bases_digest() -> str:
    """SHA-256 over what a drawn basis depends on: the source of the draw and torch's version."""
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "-"
    h = hashlib.sha256(torch_version.encode())
    h.update((Path(__file__).resolve().parents[1] / _BASES_SOURCE).read_bytes())
    return h.hexdigest()


def bases_path(cfg: RunConfig, targets: list[str]) -> Path:
    """The bases file of ``cfg``'s model, seed, dtype and adapted modules."""
    key = {"format": CACHE_FORMAT, "seed": cfg.seed, "model": cfg.model.name, "dtype": cfg.model.dtype,
           "targets": sorted(targets), "code": _bases_digest()}
    return cache_root(cfg) / f"bases-{_digest(key)}.safetensors"


@dataclass
class CachedData:
    """What the data cache holds for one experiment."""

    task: TaskData  # the raw splits (validation held out), for the family's load_model
    partitions: list[Any]
    test: Any
    validation: Any
    partition_summary: list[dict[str, Any]] = field(default_factory=list)


class DataCache:
    """The data entry of one experiment (``data-<hash>/`` under :func:`cache_root`)."""

    def __init__(self, cfg: RunConfig, family: TaskFamily) -> None:
        d = cfg.to_dict()
        self.key_fields = {
            "format": CACHE_FORMAT,
            "seed": cfg.seed,
            "data": d["data"],
            "model": {"name": cfg.model.name, "max_length": cfg.model.max_length},
            "family": family.name,
            "files": _local_files(cfg),
            "versions": _versions(),
            "code": _source_digest(),
        }
        self.key = _digest(self.key_fields)
        self.path = cache_root(cfg) / f"data-{self.key}"

    # ------------------------------------------------------------------ read
    def load(self) -> CachedData | None:
        """The cached data, or None (no entry yet, or an unreadable one, which is then removed)."""
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            return None
        try:
            return self._read(json.loads(meta_file.read_text()))
        except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never trusted
            log.warning("florg cache: ignoring the unreadable entry %s (%s: %s); rebuilding it",
                        self.path, type(exc).__name__, exc)
            shutil.rmtree(self.path, ignore_errors=True)
            return None

    def _read(self, meta: dict[str, Any]) -> CachedData:
        if meta.get("key") != self.key:
            raise ValueError("the entry's key does not match its folder")

        def part(name: str) -> Any:
            return load_from_disk(str(self.path / name)) if name in meta["splits"] else None

        t = meta["task"]
        task = TaskData(name=t["name"], train=part("raw_train"), test=part("raw_test"),
                        text_fields=tuple(t["text_fields"]), label_names=list(t["label_names"]),
                        source=t["source"], validation=part("raw_validation"))
        return CachedData(
            task=task,
            partitions=[part(f"partition_{i}") for i in range(int(meta["num_partitions"]))],
            test=part("test"),
            validation=part("validation"),
            partition_summary=list(meta["partition_summary"]),
        )

    # ------------------------------------------------------------------ write
    def save(self, data: CachedData) -> bool:
        """Store ``data`` (every split must be a ``datasets.Dataset``); False if it cannot be cached."""
        splits = {"raw_train": data.task.train, "raw_test": data.task.test, "raw_validation": data.task.validation,
                  "test": data.test, "validation": data.validation,
                  **{f"partition_{i}": p for i, p in enumerate(data.partitions)}}
        splits = {k: v for k, v in splits.items() if v is not None}
        if not all(isinstance(v, Dataset) for v in splits.values()):
            log.info("florg cache: not caching the data (a split is not a datasets.Dataset)")
            return False
        root = self.path.parent
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=root))
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            for name, ds in splits.items():
                ds.save_to_disk(str(tmp / name))
            t = data.task
            meta = {"key": self.key, "key_fields": self.key_fields, "splits": sorted(splits),
                    "num_partitions": len(data.partitions), "partition_summary": data.partition_summary,
                    "task": {"name": t.name, "text_fields": list(t.text_fields), "label_names": list(t.label_names),
                             "source": t.source}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks the entry complete
            try:
                os.rename(tmp, self.path)  # atomic; fails if another process stored the entry first
            except OSError:
                if not (self.path / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if bars:
                datasets.enable_progress_bars()
        return True
