"""kohya's keys that loralab accepts without using them, and why."""

from __future__ import annotations

# kohya keys that do nothing here; accepted so existing configs load
IGNORED_KOHYA_KEYS = {
    "xformers": "attention uses torch SDPA", "sdpa": "attention uses torch SDPA", "mem_eff_attn": "attention uses torch SDPA",
    "max_data_loader_n_workers": "images load in the main process", "persistent_data_loader_workers": "no loader workers",
    "lowram": "not needed", "highvram": "not needed", "log_with": "TensorBoard when logging_dir is set",
    "log_tracker_name": "not used", "save_n_epoch_ratio": "use save_every_n_epochs", "dataset_repeats": "repeats come from folder names",
    "sample_sampler_args": "not used", "mixed_precision_vae": "not used", "no_half_vae": "the VAE runs in fp32",
}
