"""florg: federated fine-tuning of transformers with FLoRG (low-rank Gram matrices + Procrustes).

Importing ``florg`` registers the ``FLORG`` PEFT type, so ``get_peft_model(model, FLoRGConfig(...))``
and ``PeftModel.from_pretrained(base, adapter_dir)`` work. The layers:

* ``florg.core``     -- the math in pure torch (bases, Gram aggregation, Procrustes, diagnostics)
* ``florg.adapters`` -- the FLoRG PEFT tuner and exact export to plain LoRA
* ``florg.methods``  -- federated methods (client adapter shape + server rule), one file each
* ``florg.fl``       -- Flower glue (strategy, ClientApp, ServerApp, simulation)
* ``florg.cli``      -- the ``florg`` command
"""

from florg.adapters import FLoRGConfig, FLoRGModel, export_lora, florg_layers, save_as_lora
from florg.core import (
    AggregationResult,
    GramAccumulator,
    aggregate,
    aggregate_model,
    gram_eigen,
    init_factor,
    layer_seed,
    make_bases,
    procrustes_align,
)

__version__ = "0.1.0"

__all__ = [
    "AggregationResult",
    "FLoRGConfig",
    "FLoRGModel",
    "GramAccumulator",
    "aggregate",
    "aggregate_model",
    "export_lora",
    "florg_layers",
    "gram_eigen",
    "init_factor",
    "layer_seed",
    "make_bases",
    "procrustes_align",
    "save_as_lora",
    "__version__",
]
