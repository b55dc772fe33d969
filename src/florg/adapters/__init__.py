"""FLoRG as a PEFT tuner, plus exact export to plain LoRA.

Importing this package registers the ``"FLORG"`` PEFT type, after which the usual PEFT entry
points work::

    import florg.adapters
    from peft import PeftModel, get_peft_model

    model = get_peft_model(base, florg.adapters.FLoRGConfig(r=4, lora_alpha=16, target_modules=["query", "value"]))
    model.save_pretrained("out")                      # saves only A (and modules_to_save)
    model = PeftModel.from_pretrained(base2, "out")   # bases regenerated from the seed
    florg.adapters.save_as_lora(model, "out-lora")    # loads with plain PEFT, no florg needed
"""

from ._peft_registry import SUPPORTED_PEFT_VERSION, ensure_compatible_peft, is_registered, register_florg

# Fail with one clear error before the tuner modules import PEFT internals.
ensure_compatible_peft()

from .export import export_lora, save_as_lora  # noqa: E402  (after the PEFT version check)
from .florg import (  # noqa: E402  (after the PEFT version check)
    FLORG_PEFT_TYPE,
    BasisStore,
    FLoRGConfig,
    FLoRGLayer,
    FLoRGModel,
    Linear,
    basis_store,
    clean_module_name,
    florg_layers,
    get_florg_factors,
    set_florg_factors,
)

register_florg()

__all__ = [
    "BasisStore",
    "FLORG_PEFT_TYPE",
    "SUPPORTED_PEFT_VERSION",
    "FLoRGConfig",
    "FLoRGLayer",
    "FLoRGModel",
    "Linear",
    "basis_store",
    "clean_module_name",
    "export_lora",
    "florg_layers",
    "get_florg_factors",
    "is_registered",
    "register_florg",
    "save_as_lora",
    "set_florg_factors",
]
