"""LoRA networks: modules, injection into the UNet / text encoders, kohya-format files (see `lora.py`)."""

from loralab.network.lora import LoadInfo, LoRAModule, LoRANetwork, NetworkConfig

__all__ = ["LoadInfo", "LoRAModule", "LoRANetwork", "NetworkConfig"]
