"""Flower glue: records <-> tensors, the strategies, the ClientApp and ServerApp, the simulation.

ML code lives in ``florg.core`` / ``florg.methods`` / ``florg.train``; this package only moves
records, samples clients and counts bytes.
"""

from .florg_strategy import FeDeRA, FedIT, FedSALoRA, FFALoRA, FLoRG
from .strategy import AdapterStrategy, RoundLog

__all__ = ["AdapterStrategy", "FFALoRA", "FLoRG", "FeDeRA", "FedIT", "FedSALoRA", "RoundLog"]
