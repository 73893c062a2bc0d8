"""loralab: a LoRA trainer and troubleshooting lab for Stable Diffusion."""

__version__ = "0.1.0"
