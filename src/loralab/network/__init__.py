"""LoRA networks: modules (`modules.py`), target names (`targets.py`), kohya-format files (`files.py`), and the
network that ties them together (`lora.py`)."""

from loralab.network.lora import LoadInfo, LoRANetwork, NetworkConfig
from loralab.network.modules import LoRAModule

__all__ = ["LoadInfo", "LoRAModule", "LoRANetwork", "NetworkConfig"]
