"""The run directory: resolved config, versions, per-round metrics, plots, the final adapter.

Layout::

    runs/<name>/
      config.toml        the resolved config (re-run with `florg run --config runs/<name>/config.toml`)
      environment.json   seed, package versions, python, platform, command line
      status.json        {"status": "running" | "complete" | "failed" | "interrupted", ...}
      partitions.json    per-client sizes and label histograms
      metrics.jsonl      one row per round (round 0 = the untrained model); every field except
                         "timing" is deterministic for a fixed config and seed
      plots/<metric>_vs_round.png, plots/<metric>_vs_bytes.png (linear MB from round 0), plots/loss_vs_round.png
                         (the task's primary metric: accuracy, f1 for extractive QA, loss for instruction tuning)
      adapter/           the final adapter in PEFT format (PeftModel.from_pretrained after `import florg`)
      adapter_lora/      the same adapter exported as a plain PEFT LoRA (no florg needed to load it); each
                         adapter folder also holds its model card README.md, the tokenizer, labels.json
                         (classification) and PEFT's task_type (florg.run.outputs)
      generations.jsonl  instruction tuning: greedy answers before/after training (florg.tasks.instruction)
      summary.json       the primary metric before/after, total bytes, wall time, the task family's extras

A run directory is only created once the config, data and model have loaded; ``status.json``
says whether it finished.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import tomli_w

from florg.config import RunConfig

__all__ = ["RunDir", "package_versions"]

_PACKAGES = (
    "florg", "torch", "transformers", "peft", "flwr", "flwr-datasets", "datasets", "numpy", "ray", "safetensors",
    "dp-accounting",
)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def default_run_name(cfg: RunConfig) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    task = cfg.data.task.replace("/", "-")
    return f"{cfg.method.name}-{task}-seed{cfg.seed}-{stamp}"


class RunDir:
    """Writes the files of one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, cfg: RunConfig, path: str | Path | None = None) -> RunDir:
        """Create ``path`` (default ``<out_dir>/<name>``) and write the config and environment."""
        path = Path(path) if path else Path(cfg.out_dir) / (cfg.name or default_run_name(cfg))
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(
                f"run directory '{path}' already exists and is not empty; choose another name (name=...) or remove it"
            )
        path.mkdir(parents=True, exist_ok=True)
        rd = cls(path)
        rd.write_config(cfg)
        env = {
            "seed": cfg.seed,
            "versions": package_versions(),
            "platform": platform.platform(),
            "argv": sys.argv,
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        _atomic_write(path / "environment.json", json.dumps(env, indent=2))
        rd.set_status("running")
        (path / "metrics.jsonl").write_text("")
        return rd

    def write_config(self, cfg: RunConfig) -> None:
        """(Re)write ``config.toml``, the resolved config (``florg run --resume`` reads it)."""
        _atomic_write(self.path / "config.toml", tomli_w.dumps(_toml_safe(cfg.to_dict())))

    def status(self) -> dict[str, Any]:
        p = self.path / "status.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def set_status(self, status: str, **extra: Any) -> None:
        _atomic_write(self.path / "status.json", json.dumps({"status": status, **extra}, indent=2))

    def write_json(self, name: str, obj: Any) -> None:
        _atomic_write(self.path / name, json.dumps(obj, indent=2))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Atomically replace ``metrics.jsonl`` with ``rows`` (used on resume)."""
        _atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def read_metrics(self) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _toml_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _toml_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_toml_safe(v) for v in obj]
    return obj
