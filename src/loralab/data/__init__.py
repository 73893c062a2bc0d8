"""Dataset folders and captions, buckets, images and the latent cache.

- `buckets`: bucket resolutions, bucket choice, resize and crop (kohya rules; no torch).
- `captions`: the per-step caption pipeline (keep tokens, shuffle, dropouts, wildcards) and tag counting.
- `images`: image sizes, loading as RGB, and the bucket resize + crop into a [-1, 1] tensor.
- `augment`: the per-step pixel augmentations color_aug and random_crop (kohya's draws and formulas).
- `dataset`: the `<repeats>_<name>/` folder layout, repeats, reg balancing, batches per epoch.
- `dataset_config`: sd-scripts' dataset TOML ([general], [[datasets]], [[datasets.subsets]]): keys, precedence,
  problems; `dataset_group`: its datasets trained together (multi-resolution), their batches and metadata.
- `latents`: the VAE latent cache in memory and in kohya-named .npz files.
- `transfer`: a step's inputs to the training device without a host wait (pinned, non-blocking copies).

Only `latents`, `transfer` and `text_encoder_cache` (and `images.prepare_image`, lazily) import torch.
"""
