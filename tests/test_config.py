"""Config: kohya key names, TOML + command-line overrides, validation before any model loads."""

import subprocess
import sys

import pytest

from loralab.config.kohya import parse_command_line
from loralab.config import TrainConfig, build_config, config_help
from loralab.errors import LoralabError


@pytest.fixture
def paths(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    data = tmp_path / "img"
    data.mkdir()
    return model, data


def write_toml(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_toml_sections_are_flattened_and_cli_wins(tmp_path, paths):
    model, data = paths
    p = write_toml(tmp_path, f"""
[model]
pretrained_model_name_or_path = "{model}"
clip_skip = 2
[dataset]
train_data_dir = "{data}"
resolution = "512,768"
[training]
network_dim = 16
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99"]
lr_warmup_steps = 0.1
lr_scheduler = "cosine"
""")
    cfg = build_config(p, {"network_dim": "32", "shuffle_caption": "true"})
    assert cfg.network_dim == 32 and cfg.clip_skip == 2 and cfg.shuffle_caption is True
    assert cfg.resolution_wh() == (512, 768)
    assert cfg.optimizer_args == ["weight_decay=0.01", "betas=0.9,0.99"]
    assert cfg.lr_warmup_steps == pytest.approx(0.1)


def test_unknown_key_names_it_and_suggests(tmp_path, paths):
    model, data = paths
    p = write_toml(tmp_path, f'pretrained_model_name_or_path = "{model}"\ntrain_data_dir = "{data}"\nnetwork_dimm = 8\n')
    with pytest.raises(LoralabError, match=r"network_dimm: unknown key \(.*\)\. Did you mean network_dim"):
        build_config(p)


@pytest.mark.parametrize("key,value,match", [
    ("network_dim", "abc", "network_dim"),
    ("mixed_precision", "fp8", "mixed_precision.*no, fp16, bf16"),
    ("lr_scheduler", "cosinus", "lr_scheduler"),
    ("resolution", "511", "multiples of 8"),
    ("max_token_length", "100", "max_token_length"),
    ("caption_dropout_rate", "1.5", "caption_dropout_rate"),
    ("shuffle_caption", "maybe", "shuffle_caption"),
])
def test_bad_values_are_rejected_with_the_key(paths, key, value, match):
    model, data = paths
    with pytest.raises(LoralabError, match=match):
        build_config(None, {"pretrained_model_name_or_path": str(model), "train_data_dir": str(data), key: value})


def test_missing_paths_are_reported(tmp_path, paths):
    model, data = paths
    with pytest.raises(LoralabError, match="pretrained_model_name_or_path.*does not exist"):
        build_config(None, {"pretrained_model_name_or_path": str(tmp_path / "nope.safetensors"), "train_data_dir": str(data)})
    with pytest.raises(LoralabError, match="train_data_dir: missing"):
        build_config(None, {"pretrained_model_name_or_path": str(model)})


def test_constant_scheduler_refuses_warmup(paths):
    model, data = paths
    with pytest.raises(LoralabError, match="constant_with_warmup"):
        build_config(None, {"pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "lr_warmup_steps": "10"})


def test_network_args_in_kohya_syntax(paths):
    model, data = paths
    cfg = build_config(None, {"pretrained_model_name_or_path": str(model), "train_data_dir": str(data),
                              "network_args": ["conv_dim=8", "conv_alpha=4", "rank_dropout=0.1"]})
    assert cfg.network_options() == {"conv_dim": 8, "conv_alpha": 4.0, "rank_dropout": 0.1, "module_dropout": 0.0}
    with pytest.raises(LoralabError, match="network_args: unknown argument 'algo_'"):
        TrainConfig(network_args=["algo_=loha"]).network_options()
    with pytest.raises(LoralabError, match="network_args algo: options of lycoris.kohya, not of networks.lora"):
        TrainConfig(network_args=["algo=loha"]).network_config()  # LyCORIS's algo needs network_module lycoris.kohya


def test_ignored_kohya_keys_are_accepted(tmp_path, paths):
    model, data = paths
    p = write_toml(tmp_path, f'pretrained_model_name_or_path = "{model}"\ntrain_data_dir = "{data}"\nxformers = true\n'
                             'max_data_loader_n_workers = 4\n')
    assert build_config(p).train_data_dir == str(data)


def test_cli_override_parsing():
    assert parse_command_line(["--network_dim", "8", "--flip_aug", "--unet_lr", "-1", "--optimizer_args", "a=1", "b=2"]) == {
        "network_dim": "8", "flip_aug": "true", "unet_lr": "-1", "optimizer_args": ["a=1", "b=2"]}
    assert parse_command_line(["--seed=3"]) == {"seed": "3"}


def test_help_lists_every_key_with_default():
    text = config_help()
    for key in ("network_dim", "min_snr_gamma", "keep_tokens", "scale_weight_norms", "save_every_n_epochs"):
        assert key in text
    out = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--help"], capture_output=True, text=True, check=True)
    assert "multires_noise_discount = 0.3" in out.stdout


def test_cli_prints_error_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--network_dim", "8"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr == ("error: 2 problems in the config:\n"
                          "  - pretrained_model_name_or_path: missing; give the base model file or folder\n"
                          "  - train_data_dir: missing; give the folder that holds <repeats>_<name>/ image folders\n")


def test_key_equals_value_on_the_command_line_keeps_the_value_as_written():
    assert parse_command_line(["--learning_rate=1e-4", "--output_name=my-lora", "--network-dim", "8"]) == {
        "learning_rate": "1e-4", "output_name": "my-lora", "network_dim": "8"}


def test_every_problem_of_a_file_in_one_message(tmp_path, paths, caplog):
    model, data = paths
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'pretrained_model_name_or_path = "{model}"\ntrain_data_dir = "{data}"\n'
                   'epoch = 10\nconfig_file = "x.toml"\nnetwork_dimm = 8\nzzz_unheard_of = 1\n'
                   'learning_rate = "fast"\nlog_with = "wandb"\nxformers = true\ncaption_extention = ".caption"\n'
                   'huggingface_repo_id = ""\nmax_data_loader_n_workers = 8\n')
    with caplog.at_level("INFO"), pytest.raises(LoralabError) as e:
        build_config(cfg)
    assert str(e.value) == (
        "6 problems in the config:\n"
        f"  - epoch: unknown key ({cfg}). Did you mean max_train_epochs?\n"
        f"  - config_file: unknown key ({cfg}). Did you mean --config FILE on the command line?\n"
        f"  - network_dimm: unknown key ({cfg}). Did you mean network_dim?\n"
        f"  - zzz_unheard_of: unknown key ({cfg}). `loralab train --help` lists every key.\n"
        f"  - learning_rate ({cfg}): bad value 'fast': could not convert string to float: 'fast'\n"
        f"  - log_with = 'wandb': Weights & Biases logging is not supported; TensorBoard logs go to logging_dir "
        f"(remove log_with or set it to \"tensorboard\") ({cfg})")
    assert "xformers" in caplog.text and "attention uses torch SDPA" in caplog.text


def test_kohya_keys_without_effect_aliases_and_off_values_load(tmp_path, paths, caplog):
    model, data = paths
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'pretrained_model_name_or_path = "{model}"\ntrain_data_dir = "{data}"\n'
                   'xformers = true\nlog_with = "tensorboard"\nhuggingface_repo_id = ""\ndynamo_backend = "no"\n'
                   'caption_extention = ".caption"\nuse_8bit_adam = true\nmasked_loss = false\ndeepspeed = false\n'
                   'max_data_loader_n_workers = 8\n')
    with caplog.at_level("INFO"):
        c = build_config(cfg)
    assert c.caption_extension == ".caption" and c.optimizer_type == "AdamW8bit"
    assert f"max_data_loader_n_workers ({cfg}): no effect in loralab: images load in the main process" in caplog.text
    for key, value, words in [("masked_loss", "true", "masked_loss: there are no masks to apply"),
                              ("blocks_to_swap", "2", "block swapping\\) is not supported"),
                              ("huggingface_repo_id", "me/lora", "does not upload")]:
        with pytest.raises(LoralabError, match=words):
            build_config(cfg, {key: value})


def test_torch_compile_keys_are_kohyas_and_bad_values_are_refused(paths):
    model, data = paths
    base = {"pretrained_model_name_or_path": str(model), "train_data_dir": str(data)}
    c = build_config(None, {**base, "torch_compile": "true", "dynamo_backend": "aot_eager"})
    assert c.torch_compile and c.dynamo_backend == "aot_eager" and c.log_every_n_steps == 10
    assert build_config(None, {**base, "dynamo_backend": "NO"}).dynamo_backend == "NO"
    with pytest.raises(LoralabError, match="dynamo_backend: 'tvm' is not a torch.compile backend loralab runs"):
        build_config(None, {**base, "torch_compile": "true", "dynamo_backend": "tvm"})
    with pytest.raises(LoralabError, match="log_every_n_steps: must be at least 1, got 0"):
        build_config(None, {**base, "log_every_n_steps": "0"})


def test_dry_run_prints_keys_with_sources_dataset_and_family_and_loads_nothing(tmp_path, tiny_sd1_checkpoint):
    from test_train import make_dataset

    img, reg = make_dataset(tmp_path)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'pretrained_model_name_or_path = "{tiny_sd1_checkpoint}"\ntrain_data_dir = "{img}"\n'
                   f'reg_data_dir = "{reg}"\nresolution = 64\nmax_train_epochs = 3\noutput_dir = "{tmp_path / "out"}"\n')
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--config", str(cfg), "--dry-run",
                        "--network_dim", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert f"    max_train_epochs                   = 3  [{cfg}]" in out
    assert "    network_dim                        = 8  [command line]" in out
    assert "    learning_rate                      = 0.0001  [default]" in out
    assert f"  {img}/3_alpha: 3 images x 3 repeats (train, class tokens 'alpha')" in out
    assert f"  {reg}/1_thing: 4 images x 1 repeats (reg, class tokens 'thing')" in out
    assert "batch size 1, 26 batches per epoch, 26 steps per epoch, 3 epochs, 78 steps" in out
    assert f"model: {tiny_sd1_checkpoint}: SD 1.x (weights not loaded)" in out
    assert "SD 1.x checkpoint:" not in r.stderr  # the loader's line: no weights were read
    assert not (tmp_path / "out").exists()


def test_config_import_writes_the_loralab_toml_and_says_what_it_did(tmp_path, paths):
    model, data = paths
    src = tmp_path / "kohya.toml"
    src.write_text(f'[model_arguments]\npretrained_model_name_or_path = "{model}"\n'
                   f'[dataset_arguments]\ntrain_data_dir = "{data}"\ncaption_extention = ".caption"\n'
                   'resolution = "768,512"\n[training_arguments]\noutput_name = "my-lora"\nxformers = true\n'
                   'max_train_epochs = 10\nuse_8bit_adam = true\nlog_with = "wandb"\n'
                   '[network_arguments]\nnetwork_dim = 32\nnetwork_args = ["conv_dim=4", "conv_alpha=1"]\n')
    out = tmp_path / "run.toml"
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "config", "import", str(src), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2  # one key could not be imported: said, and the file is still written
    assert "  - caption_extention: read as caption_extension = '.caption'" in r.stdout
    assert "  - use_8bit_adam: read as optimizer_type = 'AdamW8bit'" in r.stdout
    assert "  - xformers: no effect in loralab: attention uses torch SDPA" in r.stdout
    assert "not imported (fix these):\n  - log_with = 'wandb': Weights & Biases logging is not supported" in r.stdout
    assert f"wrote {out} (fix the keys under 'not imported' before training)" in r.stdout
    cfg = build_config(out)  # the written file loads as it is, with the kohya file's values
    assert (cfg.caption_extension, cfg.resolution, cfg.output_name, cfg.max_train_epochs, cfg.optimizer_type,
            cfg.network_dim, cfg.network_args) == (".caption", "768,512", "my-lora", 10, "AdamW8bit", 32,
                                                   ["conv_dim=4", "conv_alpha=1"])
    again = subprocess.run([sys.executable, "-m", "loralab.cli", "config", "import", str(src), "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and f"error: config import: {out} exists" in again.stderr


def test_every_sd_scripts_training_key_is_used_ignored_or_refused_knowingly():
    """Each argument of sd-scripts' LoRA scripts is a loralab key, an alias, or in config/kohya.py's table
    (no effect, or refused when switched on); none is merely unknown."""
    from dataclasses import fields
    from pathlib import Path

    from loralab.config import TrainConfig
    from loralab.config.kohya import ALIASES, FOREIGN, SUGGEST

    listed = Path(__file__).parent / "data" / "sd_scripts_keys.txt"
    keys = [line.split()[1] for line in listed.read_text().splitlines() if line and not line.startswith("#")]
    assert len(keys) > 180
    ours = {f.name for f in fields(TrainConfig)}
    assert [k for k in keys if k not in ours and k not in FOREIGN and k not in ALIASES and k not in SUGGEST] == []


SD_SCRIPTS_STYLE = """\
# a config in the style people write for sd-scripts' train_network.py --config_file: every option in
# [sections], many at their defaults, some commented out
[Basics]
pretrained_model_name_or_path = "{model}"
train_data_dir = "{data}"
resolution = "512"
seed = 23
max_train_steps = 10000   # max_train_epochs wins
max_train_epochs = 2
clip_skip = 2

[Save]
output_dir = "{out}"
output_name = "name"
save_precision = "fp16"
save_model_as = "safetensors"
save_every_n_epochs = 10
save_state = false
save_last_n_steps_state = 1
# save_n_epoch_ratio = 10

[Network_setup]
network_dim = 8
network_alpha = 4.0
dim_from_weights = false
network_dropout = 0
network_train_unet_only = false
resume = false
network_module = "networks.lora"
network_args = ["conv_dim=4", "conv_alpha=1"]

[Optimizer]
train_batch_size = 8
gradient_accumulation_steps = 1
optimizer_type = "AdamW8bit"
unet_lr = 0.0002
text_encoder_lr = 0.0001
max_grad_norm = 1.0
optimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]
lr_scheduler_type = ""
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 80
lr_scheduler_num_cycles = 3

[Precision]
mixed_precision = "bf16"
full_fp16 = false

[Further]
min_snr_gamma = 5
multires_noise_discount = 0.3
multires_noise_iterations = 10
scale_weight_norms = 1
scale_v_pred_loss_like_noise_pred = false

[Buckets]
enable_bucket = true
min_bucket_reso = 320
max_bucket_reso = 960
bucket_reso_steps = 64
bucket_no_upscale = false

[Captions]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
caption_dropout_rate = 0.05
max_token_length = 150
weighted_captions = false
token_warmup_min = 1
token_warmup_step = 0

[Other]
mem_eff_attn = false
xformers = true
color_aug = false
flip_aug = false
random_crop = false
cache_latents = true
cache_latents_to_disk = true
vae_batch_size = 1
sample_sampler = "ddim"
logging_dir = "logs_training"
log_with = "tensorboard"
log_prefix = "run_"
max_data_loader_n_workers = 8
persistent_data_loader_workers = true
dataset_repeats = 1
prior_loss_weight = 1.0
save_state_to_huggingface = false
resume_from_huggingface = false
async_upload = false
debug_dataset = false
use_8bit_adam = false
use_lion_optimizer = false
learning_rate = 0.0002
lowram = false
training_comment = ""
"""


def test_a_full_sd_scripts_style_config_loads_unchanged_except_paths(tmp_path, paths):
    model, data = paths
    cfg_file = tmp_path / "sd_scripts.toml"
    cfg_file.write_text(SD_SCRIPTS_STYLE.format(model=model, data=data, out=tmp_path / "out"))
    c = build_config(cfg_file)
    got = {k: getattr(c, k) for k in ("max_train_epochs", "resume", "network_dim", "network_alpha", "network_args",
                                      "optimizer_type", "optimizer_args", "unet_lr", "text_encoder_lr",
                                      "lr_scheduler", "lr_warmup_steps", "lr_scheduler_num_cycles", "resolution",
                                      "enable_bucket", "min_bucket_reso", "max_bucket_reso", "mixed_precision",
                                      "keep_tokens", "max_token_length", "save_last_n_steps_state", "cache_latents")}
    assert got == {"max_train_epochs": 2, "resume": "", "network_dim": 8, "network_alpha": 4.0,
                   "network_args": ["conv_dim=4", "conv_alpha=1"], "optimizer_type": "AdamW8bit",
                   "optimizer_args": ["weight_decay=0.1", "betas=0.9,0.99"], "unet_lr": 2e-4, "text_encoder_lr": 1e-4,
                   "lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 80.0, "lr_scheduler_num_cycles": 3,
                   "resolution": "512,512", "enable_bucket": True, "min_bucket_reso": 320, "max_bucket_reso": 960,
                   "mixed_precision": "bf16", "keep_tokens": 1, "max_token_length": 150, "save_last_n_steps_state": 1,
                   "cache_latents": True}
