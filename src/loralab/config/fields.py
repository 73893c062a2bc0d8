"""The training config's keys: kohya-ss sd-scripts argument names, their defaults and meanings, and the
option objects the other layers take from a config (network, captions, buckets, noise)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loralab.errors import LoralabError


def _f(default: Any, help: str, *, choices: tuple | None = None, group: str = "") -> Any:
    meta = {"help": help, "choices": choices, "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "Prodigy", "DAdaptation", "DAdaptAdam",
              "DAdaptLion", "DAdaptSGD", "DAdaptAdaGrad", "DAdaptAdan", "Adafactor")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "cosine_with_min_lr", "inverse_sqrt", "warmup_stable_decay", "piecewise_constant", "adafactor")
SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


@dataclass
class TrainConfig:
    # --- model
    pretrained_model_name_or_path: str = _f("", "base model: single-file .safetensors/.ckpt (LDM layout) or a diffusers folder", group="model")
    v2: bool = _f(False, "SD 2.x model (detected from the checkpoint; kept for kohya configs)", group="model")
    v_parameterization: bool = _f(False, "v-prediction model (SD 2.x 768-v); loss target is the velocity", group="model")
    vae: str = _f("", "separate VAE file or folder to use instead of the checkpoint's", group="model")
    clip_skip: int = _f(0, "use the k-th last text-encoder layer (2 for NAI-style anime models; 0/1 = last)", group="model")
    max_token_length: int = _f(75, "caption tokens: 75, 150 or 225 (75-token chunks)", choices=(75, 150, 225), group="model")
    device: str = _f("", "torch device (default: cuda if available, else cpu)", group="model")
    # --- slider (sliders / LECO: a LoRA trained from prompts alone, `recipes/slider.py`)
    prompts_file: str = _f("", "slider / LECO prompt file (TOML [[prompts]] or a YAML list; keys target, positive, "
                           "negative (= unconditional), neutral, action = enhance|erase, guidance_scale, multiplier, "
                           "bidirectional, resolution, batch_size): set, it trains from these prompts, no images",
                           group="slider")
    max_denoising_steps: int = _f(40, "slider / LECO: each step denoises to a random one of this many sampler steps "
                                  "before the loss", group="slider")
    leco_denoise_guidance_scale: float = _f(3.0, "slider / LECO: CFG scale of that partial denoising", group="slider")
    leco_training_method: str = _f("full", "slider / LECO: which UNet LoRA modules train (LECO's training_method): full, "
                                   "xattn (cross-attention only: ESD-x), xattn_kv (its key/value projections only, "
                                   "which see only the text), selfattn, noxattn, innoxattn",
                                   choices=("full", "xattn", "xattn_kv", "selfattn", "noxattn", "innoxattn"),
                                   group="slider")
    # --- dataset
    train_data_dir: str = _f("", "folder holding <repeats>_<name>/ image folders", group="dataset")
    reg_data_dir: str = _f("", "folder holding <repeats>_<class>/ regularization image folders", group="dataset")
    caption_extension: str = _f(".txt", "caption file extension next to each image", group="dataset")
    resolution: str = _f("512", "training resolution 'W,H' or 'S'", group="dataset")
    enable_bucket: bool = _f(False, "aspect-ratio buckets", group="dataset")
    min_bucket_reso: int = _f(256, "smallest bucket side", group="dataset")
    max_bucket_reso: int = _f(1024, "largest bucket side", group="dataset")
    bucket_reso_steps: int = _f(64, "bucket side step (64 for SD 1.x/2.x)", group="dataset")
    bucket_no_upscale: bool = _f(False, "never upscale images to a bigger bucket", group="dataset")
    flip_aug: bool = _f(False, "random horizontal flip (p=0.5)", group="dataset")
    shuffle_caption: bool = _f(False, "shuffle comma-separated tags (keep_tokens stay in front)", group="dataset")
    keep_tokens: int = _f(0, "first N tags are never shuffled or dropped (activation tags)", group="dataset")
    keep_tokens_separator: str = _f("", "tags before this separator are kept (overrides keep_tokens)", group="dataset")
    caption_separator: str = _f(",", "tag separator", group="dataset")
    secondary_separator: str = _f("", "separator inside a tag group, replaced by caption_separator", group="dataset")
    enable_wildcard: bool = _f(False, "{a|b} wildcards and multi-line captions", group="dataset")
    caption_prefix: str = _f("", "text added before every caption", group="dataset")
    caption_suffix: str = _f("", "text added after every caption", group="dataset")
    caption_dropout_rate: float = _f(0.0, "probability of training an image with an empty caption", group="dataset")
    caption_dropout_every_n_epochs: int = _f(0, "empty captions for a whole epoch every N epochs", group="dataset")
    caption_tag_dropout_rate: float = _f(0.0, "probability of dropping each non-kept tag", group="dataset")
    weighted_captions: bool = _f(False, "(tag:1.2) weights in captions scale those tokens' text embeddings", group="dataset")
    token_warmup_min: int = _f(1, "token warmup: flexible tags trained at step 0", group="dataset")
    token_warmup_step: float = _f(0.0, "token warmup: steps (or a fraction < 1 of all steps) until every tag is "
                                  "trained; 0 = off", group="dataset")
    color_aug: bool = _f(False, "kohya's colour augmentation: a random hue shift or gamma on a third of the steps (no "
                         "latent cache)", group="dataset")
    random_crop: bool = _f(False, "random crop position instead of the centre (kohya; no latent cache)", group="dataset")
    dataset_config: str = _f("", "sd-scripts dataset TOML ([general], [[datasets]], [[datasets.subsets]]) instead of "
                             "train_data_dir / reg_data_dir", group="dataset")
    prior_loss_weight: float = _f(1.0, "loss weight of regularization images", group="dataset")
    masked_loss: bool = _f(False, "weight the loss per pixel by a mask: the mask images of a dataset_config subset's "
                           "conditioning_data_dir (white = trained, black = ignored), or alpha_mask", group="dataset")
    alpha_mask: bool = _f(False, "use each image's alpha channel as its loss mask (opaque = trained; an image without "
                          "alpha counts whole); a dataset_config subset may set its own", group="dataset")
    cache_latents: bool = _f(False, "encode images once and keep latents in memory", group="dataset")
    cache_latents_to_disk: bool = _f(False, "cache latents in .npz files next to the images (reused by later runs)", group="dataset")
    vae_batch_size: int = _f(1, "batch size when caching latents", group="dataset")
    cache_text_encoder_outputs: bool = _f(False, "encode each caption once (text encoders frozen: network_train_unet_only or "
                                          "text_encoder_lr = 0; no shuffle_caption, tag dropout or wildcards; "
                                          "caption dropout uses a cached empty caption); done in memory without "
                                          "this key whenever those hold", group="dataset")
    cache_text_encoder_outputs_to_disk: bool = _f(False, "also keep them in <stem>_te_outputs.npz next to the images "
                                                  "(implies cache_text_encoder_outputs)", group="dataset")
    # --- network
    network_module: str = _f("networks.lora", "network type: networks.lora (LoRA / LoCon with conv_dim), lycoris.kohya "
                             "(network_args algo=loha|lokr|locon|dylora|full, dora_wd=True for DoRA), networks.dylora "
                             "(unit)", choices=("networks.lora", "lycoris.kohya", "networks.dylora"), group="network")
    network_dim: int = _f(4, "LoRA rank", group="network")
    network_alpha: float = _f(1.0, "LoRA alpha; scale = alpha / dim", group="network")
    network_dropout: float = _f(0.0, "dropout on the LoRA down projection (training only)", group="network")
    network_args: list = _f([], "kohya network_args 'k=v' list: conv_dim, conv_alpha, rank_dropout, module_dropout, "
                            "loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio; lycoris.kohya: "
                            "algo, preset, factor, dora_wd, use_tucker, decompose_both, dropout, block_size; "
                            "networks.dylora: unit; block-wise (networks.lora): down_lr_weight, mid_lr_weight, "
                            "up_lr_weight, block_lr_zero_threshold, block_dims, block_alphas, conv_block_dims, "
                            "conv_block_alphas (block numbering: end of `loralab train --help`)", group="network")
    conv_dim: int = _f(0, "rank for the ResNet 3x3 convs (LoCon); 0 = off", group="network")
    conv_alpha: float = _f(1.0, "alpha for conv_dim", group="network")
    rank_dropout: float = _f(0.0, "drop each rank with this probability (training only)", group="network")
    module_dropout: float = _f(0.0, "skip a whole LoRA module with this probability (training only)", group="network")
    loraplus_lr_ratio: float = _f(0.0, "LoRA+: the lora_up (B) weights train at lr x this ratio (kohya network_args; "
                                  "16 is the paper's value; 0 = off)", group="network")
    loraplus_unet_lr_ratio: float = _f(0.0, "LoRA+ ratio for the UNet only (overrides loraplus_lr_ratio; 0 = use it)",
                                       group="network")
    loraplus_text_encoder_lr_ratio: float = _f(0.0, "LoRA+ ratio for the text encoders only (overrides "
                                               "loraplus_lr_ratio; 0 = use it)", group="network")
    scale_weight_norms: float = _f(0.0, "max-norm: scale down any module whose |dW| exceeds this (0 = off)", group="network")
    network_weights: str = _f("", "continue from this LoRA file (its own dims and alphas)", group="network")
    network_train_unet_only: bool = _f(False, "train only the UNet LoRA", group="network")
    network_train_text_encoder_only: bool = _f(False, "train only the text-encoder LoRA", group="network")
    stop_text_encoder_training: int = _f(0, "stop text-encoder LoRA training after this many steps (0 = never)", group="network")
    learning_rate: float = _f(1e-4, "learning rate (fallback for unet_lr / text_encoder_lr)", group="network")
    unet_lr: float = _f(-1.0, "UNet LoRA learning rate (-1 = learning_rate)", group="network")
    text_encoder_lr: float | list = _f(-1.0, "text-encoder LoRA learning rate (-1 = learning_rate; 0 = UNet only); two "
                                       "values [TE1, TE2] give SDXL's text encoders their own (kohya: one value "
                                       "serves both)", group="network")
    # --- pivotal (pivotal tuning: new tokens trained as text-encoder embeddings with the LoRA, `recipes/pivotal.py`)
    token_string: str = _f("", "pivotal tuning: the new token(s) the captions use, comma-separated (e.g. \"vexdef\"); "
                           "set, each gets embedding vectors trained with the LoRA (kohya TI's key)", group="pivotal")
    init_word: str = _f("", "pivotal: the word(s) whose token embeddings start each new token, comma-separated, one "
                        "per token_string (one serves all; empty = random)", group="pivotal")
    num_vectors_per_token: int = _f(1, "pivotal: vectors per new token (kohya TI's key)", group="pivotal")
    embedding_lr: float = _f(-1.0, "pivotal: the new tokens' learning rate (-1 = text_encoder_lr when it is above 0, "
                             "else learning_rate: sd-scripts PR #1013's rule)", group="pivotal")
    stop_embedding_training: int = _f(0, "pivotal: freeze the new tokens after this many steps; the LoRA trains on "
                                      "(0 = never)", group="pivotal")
    # --- training
    max_train_steps: int = _f(1600, "total optimizer steps (max_train_epochs overrides)", group="training")
    max_train_epochs: int = _f(0, "total epochs (0 = use max_train_steps)", group="training")
    train_batch_size: int = _f(1, "images per batch", group="training")
    gradient_accumulation_steps: int = _f(1, "batches per optimizer step", group="training")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (less memory, slower)", group="training")
    torch_compile: bool = _f(False, "compile the UNet's training forward with torch.compile (once per bucket shape: the "
                             "first step of each shape is slow, the others faster; GPU)", group="training")
    dynamo_backend: str = _f("inductor", "torch.compile backend when torch_compile: inductor, aot_eager, eager, "
                             "cudagraphs (\"no\" = do not compile)", group="training")
    mixed_precision: str = _f("no", "autocast precision (fp16 uses loss scaling)", choices=("no", "fp16", "bf16"), group="training")
    fp8_base: bool = _f(False, "store the frozen UNet's Linear/Conv weights in float8 (computed in bf16/fp16; needs "
                        "mixed_precision bf16 or fp16): about half the UNet memory", group="training")
    save_precision: str = _f("fp16", "dtype of saved LoRA files", choices=("float", "fp32", "fp16", "bf16"), group="training")
    seed: int = _f(0, "random seed (everything derives from it)", group="training")
    max_grad_norm: float = _f(1.0, "gradient clipping (0 = off)", group="training")
    optimizer_type: str = _f("AdamW", "optimizer: " + ", ".join(OPTIMIZERS) + " or a dotted class path", group="training")
    optimizer_args: list = _f([], "optimizer keyword args, kohya syntax: 'weight_decay=0.01 betas=0.9,0.99'", group="training")
    lr_scheduler: str = _f("constant", "learning-rate schedule", choices=SCHEDULERS, group="training")
    lr_warmup_steps: float = _f(0, "warmup: a step count, or a fraction (<1) of all steps", group="training")
    lr_scheduler_num_cycles: int = _f(1, "restarts for cosine_with_restarts", group="training")
    lr_scheduler_power: float = _f(1.0, "power for polynomial", group="training")
    lr_scheduler_args: list = _f([], "scheduler keyword args, kohya syntax: 'k=v' list", group="training")
    lr_scheduler_type: str = _f("", "a scheduler class by dotted path (with lr_scheduler_args)", group="training")
    lr_decay_steps: float = _f(0, "warmup_stable_decay: decay steps (a count, or a fraction < 1 of all steps)",
                               group="training")
    lr_scheduler_timescale: int = _f(0, "inverse_sqrt timescale (0 = the warmup steps)", group="training")
    lr_scheduler_min_lr_ratio: float = _f(0.0, "cosine_with_min_lr / warmup_stable_decay: lowest lr as a ratio of "
                                          "the initial one", group="training")
    min_snr_gamma: float = _f(0.0, "min-SNR loss weighting gamma (5 is common; 0 = off)", group="training")
    noise_offset: float = _f(0.0, "noise offset (0.05-0.1 lets the model learn darker/brighter images)", group="training")
    noise_offset_random_strength: bool = _f(False, "scale noise_offset by U(0,1) each step", group="training")
    adaptive_noise_scale: float = _f(0.0, "add this times |latent mean| to the noise offset", group="training")
    multires_noise_iterations: int = _f(0, "pyramid (multires) noise levels (6-10 typical; 0 = off)", group="training")
    multires_noise_discount: float = _f(0.3, "pyramid noise discount per level", group="training")
    ip_noise_gamma: float = _f(0.0, "input perturbation noise (0.1 is common; 0 = off)", group="training")
    ip_noise_gamma_random_strength: bool = _f(False, "scale ip_noise_gamma by U(0,1) each step", group="training")
    min_timestep: int = _f(0, "smallest training timestep", group="training")
    max_timestep: int = _f(1000, "largest training timestep (exclusive)", group="training")
    loss_type: str = _f("l2", "loss: l2 (MSE), l1, huber or smooth_l1", choices=("l2", "l1", "huber", "smooth_l1"),
                        group="training")
    huber_schedule: str = _f("snr", "huber_c over timesteps: constant, exponential or snr",
                             choices=("constant", "exponential", "snr"), group="training")
    huber_c: float = _f(0.1, "huber / smooth_l1 threshold", group="training")
    huber_scale: float = _f(1.0, "huber / smooth_l1 scale", group="training")
    zero_terminal_snr: bool = _f(False, "rescale the noise schedule to zero SNR at the last timestep (v-prediction "
                                 "models such as NoobAI-XL v-pred need it)", group="training")
    debiased_estimation_loss: bool = _f(False, "weight the loss by 1/sqrt(SNR) (debiased estimation)", group="training")
    v_pred_like_loss: float = _f(0.0, "add this times a v-prediction-like loss term (0 = off)", group="training")
    scale_v_pred_loss_like_noise_pred: bool = _f(False, "scale the v-prediction loss like the noise-prediction "
                                                 "loss (SNR / (SNR + 1))", group="training")
    full_fp16: bool = _f(False, "train in fp16 entirely, gradients too (needs mixed_precision fp16)", group="training")
    full_bf16: bool = _f(False, "train in bf16 entirely, gradients too (needs mixed_precision bf16)", group="training")
    # --- validation
    validation_split: float = _f(0.0, "share of each training folder's images held out for the validation loss "
                                 "(0.1-0.2 typical; 0 = off)", group="validation")
    validation_data_dir: str = _f("", "a separate validation folder in the kohya layout (<repeats>_<name>/)",
                                  group="validation")
    validation_seed: int = _f(0, "seed of the split, the noise and the timesteps of validation (0 = seed)",
                              group="validation")
    validate_every_n_epochs: int = _f(1, "validation loss every N epochs (0 = never by epoch)", group="validation")
    validate_every_n_steps: int = _f(0, "validation loss every N steps (0 = never by step)", group="validation")
    max_validation_steps: int = _f(0, "validate on at most this many batches (0 = all)", group="validation")
    # --- output
    output_dir: str = _f("output", "where LoRA files, samples and logs go", group="output")
    output_name: str = _f("last", "file name stem of the saved LoRA", group="output")
    overwrite: bool = _f(False, "start over in an output_dir holding an earlier run's files of this output_name: they "
                         "are deleted and its train_log.jsonl is kept as train_log-before-<time>.jsonl (without "
                         "it such a run refuses to start)", group="output")
    save_every_n_epochs: int = _f(0, "save <output_name>-NNNNNN.safetensors every N epochs (0 = only at the end)", group="output")
    save_every_n_steps: int = _f(0, "save <output_name>-stepNNNNNNNN.safetensors every N steps", group="output")
    save_model_as: str = _f("safetensors", "file format: safetensors (with metadata), or ckpt / pt (torch.save of the "
                            "tensors only, as kohya)", choices=("safetensors", "ckpt", "pt"), group="output")
    save_last_n_epochs: int = _f(0, "keep only the last N epoch files (0 = keep all)", group="output")
    save_last_n_epochs_state: int = _f(0, "keep only the last N epoch state folders (0 = save_last_n_epochs)",
                                       group="output")
    save_last_n_steps: int = _f(0, "keep only the step files of the last N steps (0 = keep all)", group="output")
    save_last_n_steps_state: int = _f(0, "keep only the step state folders of the last N steps (0 = "
                                      "save_last_n_steps)", group="output")
    save_state: bool = _f(False, "save the full training state next to each save (for resume)", group="output")
    save_state_on_train_end: bool = _f(False, "save the training state at the end", group="output")
    resume: str = _f("", "resume from a state folder written by save_state", group="output")
    sample_prompts: str = _f("", "prompt file (kohya syntax: prompt --n neg --w 512 --h 512 --d seed --s steps --l cfg)", group="output")
    sample_every_n_epochs: int = _f(0, "sample images every N epochs", group="output")
    sample_every_n_steps: int = _f(0, "sample images every N steps", group="output")
    sample_at_first: bool = _f(False, "sample images before training", group="output")
    sample_sampler: str = _f("", "sampler for sample images (\"\" = ddim for SD 1.x/2.x, euler_a for SDXL)",
                             choices=("",) + SAMPLERS, group="output")
    log_every_n_steps: int = _f(10, "read the loss from the GPU every N steps (the log, the progress bar and the NaN "
                                "check then see N steps at once; each read makes the CPU wait for the GPU; saves "
                                "read it too)", group="output")
    logging_dir: str = _f("", "TensorBoard log folder (a machine-readable train_log.jsonl is always written to output_dir)", group="output")
    log_prefix: str = _f("", "prefix of the TensorBoard run folder name", group="output")
    training_comment: str = _f("", "stored as ss_training_comment", group="output")
    no_metadata: bool = _f(False, "write only the minimal ss_* metadata", group="output")
    metadata_title: str = _f("", "modelspec.title (default: output_name)", group="output")
    metadata_author: str = _f("", "modelspec.author", group="output")
    metadata_description: str = _f("", "modelspec.description", group="output")
    metadata_license: str = _f("", "modelspec.license", group="output")
    metadata_tags: str = _f("", "modelspec.tags", group="output")

    # ---------------------------------------------------------------- derived values and option objects
    def resolution_wh(self) -> tuple[int, int]:
        return parse_resolution(self.resolution)

    def trains_text_encoder(self) -> bool:
        """The text-encoder LoRA is trained: not network_train_unet_only and text_encoder_lr != 0 (kohya); with
        one value per text encoder, any of them != 0 (0 for both = UNet only)."""
        lrs = self.text_encoder_lr if isinstance(self.text_encoder_lr, list) else [self.text_encoder_lr]
        return not self.network_train_unet_only and any(lr != 0 for lr in lrs)

    def network_options(self) -> dict[str, Any]:
        """conv_dim, conv_alpha, rank_dropout, module_dropout and the three LoRA+ ratios: network_args win over
        top-level keys (kohya puts them there); plus the network type's options given in network_args (algo,
        preset, factor, dora_wd, unit, ...: network/types.py TYPE_ARGS)."""
        from loralab.network.blocks import BLOCK_KEYS
        from loralab.network.types import TYPE_ARGS, parse_type_arg

        out = {"conv_dim": self.conv_dim, "conv_alpha": self.conv_alpha, "rank_dropout": self.rank_dropout,
               "module_dropout": self.module_dropout, "loraplus_lr_ratio": self.loraplus_lr_ratio,
               "loraplus_unet_lr_ratio": self.loraplus_unet_lr_ratio,
               "loraplus_text_encoder_lr_ratio": self.loraplus_text_encoder_lr_ratio}
        for item in self.network_args:
            key, _, value = str(item).partition("=")
            key = key.strip()
            if key in BLOCK_KEYS:  # block-wise keys (network/blocks.py), kept as given: their length needs the family
                out[key] = value.strip()
                continue
            if key in TYPE_ARGS:  # the network type's options (network/types.py), kept only when given
                out[key] = parse_type_arg(key, value)
                continue
            if key not in out:
                raise LoralabError(f"network_args: unknown argument {key!r}; accepted: {', '.join(out)}, and for "
                                   f"lycoris.kohya / networks.dylora: {', '.join(TYPE_ARGS)}")
            try:
                out[key] = type(out[key])(float(value)) if key != "conv_dim" else int(float(value))
            except ValueError:
                raise LoralabError(f"network_args: {item!r} needs a number after '='") from None
        for key in LORAPLUS_KEYS:  # like kohya's net_kwargs, only when set (so ss_network_args is as before)
            if not out[key]:
                del out[key]
        return out

    def loraplus_ratios(self) -> tuple[float | None, float | None]:
        """(UNet, text encoder) LoRA+ ratios, kohya's `loraplus_unet_lr_ratio or loraplus_lr_ratio` (and the
        same for the text encoder); None (off) where neither is set."""
        opts = self.network_options()
        ratio = opts.get("loraplus_lr_ratio") or None
        return (opts.get("loraplus_unet_lr_ratio") or ratio, opts.get("loraplus_text_encoder_lr_ratio") or ratio)

    def network_config(self, train_unet: bool | None = None):
        """The LoRA network's shape and dropouts (network/lora.py NetworkConfig)."""
        from loralab.network.blocks import block_args
        from loralab.network.lora import NetworkConfig

        from loralab.network.types import type_config

        opts = self.network_options()
        kind = {"conv_dim": opts["conv_dim"] or None, "conv_alpha": opts["conv_alpha"],
                "dropout": self.network_dropout or None,
                **type_config(self.network_module, opts, self.network_dim, self.network_alpha,
                              {str(a).partition("=")[0].strip() for a in self.network_args})}
        return NetworkConfig(dim=self.network_dim, alpha=self.network_alpha,
                             rank_dropout=opts["rank_dropout"] or None, module_dropout=opts["module_dropout"] or None,
                             train_unet=not self.network_train_text_encoder_only if train_unet is None else train_unet,
                             train_text_encoder=not self.network_train_unet_only, blocks=block_args(opts), **kind)

    def caption_options(self):
        """kohya's caption pipeline options (data/captions.py CaptionOptions)."""
        from loralab.data.captions import CaptionOptions

        return CaptionOptions(
            shuffle_caption=self.shuffle_caption, caption_separator=self.caption_separator,
            keep_tokens=self.keep_tokens, keep_tokens_separator=self.keep_tokens_separator,
            secondary_separator=self.secondary_separator or None, enable_wildcard=self.enable_wildcard,
            caption_prefix=self.caption_prefix or None, caption_suffix=self.caption_suffix or None,
            caption_dropout_rate=self.caption_dropout_rate,
            caption_dropout_every_n_epochs=self.caption_dropout_every_n_epochs,
            caption_tag_dropout_rate=self.caption_tag_dropout_rate, token_warmup_min=self.token_warmup_min,
            token_warmup_step=self.token_warmup_step)

    def bucket_options(self) -> dict[str, Any]:
        """The dataset's resolution and bucket settings (keyword arguments of data/dataset.py FolderDataset)."""
        return dict(resolution=self.resolution_wh(), enable_bucket=self.enable_bucket,
                    min_bucket_reso=self.min_bucket_reso, max_bucket_reso=self.max_bucket_reso,
                    bucket_reso_steps=self.bucket_reso_steps, bucket_no_upscale=self.bucket_no_upscale)

    def noise_options(self) -> dict[str, Any]:
        """Noise and timestep settings: the keyword arguments of train/noise.py make_noisy_latents."""
        return dict(noise_offset=self.noise_offset, noise_offset_random_strength=self.noise_offset_random_strength,
                    adaptive_noise_scale=self.adaptive_noise_scale or None,
                    multires_noise_iterations=self.multires_noise_iterations,
                    multires_noise_discount=self.multires_noise_discount, min_timestep=self.min_timestep,
                    max_timestep=self.max_timestep, ip_noise_gamma=self.ip_noise_gamma or None,
                    ip_noise_gamma_random_strength=self.ip_noise_gamma_random_strength)


def parse_resolution(value: Any) -> tuple[int, int]:
    """kohya's `resolution`: one size ("512", 512) or width and height ("768,512", also "768x512", [768, 512])."""
    if isinstance(value, bool):
        raise LoralabError(f"resolution: {value!r} is not 'W,H' or a single size such as 512")
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    parts = [p.strip() for p in str(value).lower().replace("x", ",").split(",") if p.strip()]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        return nums[0], nums[0]
    if len(nums) == 2:
        return nums[0], nums[1]
    raise LoralabError(f"resolution: {value!r} is not 'W,H' or a single size such as 512")
