"""The training config: kohya-ss sd-scripts argument names, defaults and validation.

A config comes from a TOML file (`loralab train --config run.toml`) whose keys are the argument names
of kohya's `train_network.py` (sections such as `[model]` or `[training]` are flattened one level, as
kohya does), then `--key value` overrides from the command line (CLI > TOML > default).

Unlike kohya, unknown keys are an error (with the closest known names), and values are checked before
any model loads. A few kohya keys that do nothing in loralab (attention backends, dataloader worker
counts) are accepted with a note, so configs written for kohya or its GUI still load.
"""

from loralab.config.build import build_config, config_help, config_to_dict, text_encoder_cache_allowed, validate
from loralab.config.fields import OPTIMIZERS, SAMPLERS, SCHEDULERS, TrainConfig, _f, parse_resolution

__all__ = ["OPTIMIZERS", "SAMPLERS", "SCHEDULERS", "TrainConfig", "_f", "build_config", "config_help", "config_to_dict",
           "parse_resolution", "text_encoder_cache_allowed", "validate"]
