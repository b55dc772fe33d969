"""florg: federated fine-tuning of transformers with FLoRG (low-rank Gram matrices + Procrustes).

Importing ``florg`` registers the ``FLORG`` PEFT type, so ``get_peft_model(model, FLoRGConfig(...))``
and ``PeftModel.from_pretrained(base, adapter_dir)`` work. The layers:

* ``florg.core``     -- the math in pure torch (bases, Gram aggregation, Procrustes, diagnostics)
* ``florg.adapters`` -- the FLoRG PEFT tuner and exact export to plain LoRA
* ``florg.methods``  -- federated methods (client adapter shape + server rule), one file each
* ``florg.fl``       -- Flower glue (strategy, ClientApp, ServerApp, simulation)
* ``florg.cli``      -- the ``florg`` command

``import florg`` itself is cheap (the ``florg`` command starts without loading torch): the names
below are loaded on first use (PEP 562), and the ``FLORG`` PEFT type is registered as soon as
``peft`` is imported (at once if it already is), so ``import florg`` followed by any PEFT entry
point (``PeftModel``, ``AutoPeftModelFor...``) finds FLoRG adapters.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "FLoRGConfig": "florg.adapters",
    "FLoRGModel": "florg.adapters",
    "export_lora": "florg.adapters",
    "florg_layers": "florg.adapters",
    "save_as_lora": "florg.adapters",
    "AggregationResult": "florg.core",
    "GramAccumulator": "florg.core",
    "aggregate": "florg.core",
    "aggregate_model": "florg.core",
    "gram_eigen": "florg.core",
    "init_factor": "florg.core",
    "layer_seed": "florg.core",
    "make_bases": "florg.core",
    "procrustes_align": "florg.core",
    "predict": "florg.run.predict",
    "load_run_model": "florg.run.predict",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'florg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def _register_florg() -> None:
    importlib.import_module("florg.adapters")  # registers the FLORG PEFT type (florg.adapters._peft_registry)


class _RegisterWithPeft(importlib.abc.MetaPathFinder):
    """Registers FLoRG with PEFT right after ``peft`` itself has been imported (once)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "peft":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one-shot, and the lookup below must not find this finder again
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_peft = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            exec_peft(module)
            _register_florg()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "peft" in sys.modules:
    _register_florg()
elif not any(isinstance(f, _RegisterWithPeft) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithPeft())
