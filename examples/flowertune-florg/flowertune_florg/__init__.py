"""flowertune-florg: federated instruction tuning with FLoRG in the FlowerTune LLM layout."""
