"""quickstart-florg: a Flower App that federates a PEFT FLoRG adapter."""
