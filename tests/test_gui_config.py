"""kohya_ss GUI configs (bmaltais/kohya_ss, LoRA tab): the saved JSON as the sd-scripts keys the GUI would run
with (config/gui.py), checked on the GUI's own test configs and presets (tests/data/kohya_ss/, unchanged)."""

import json
from pathlib import Path

import pytest

from loralab.config import build_config
from loralab.config.fields import TrainConfig
from loralab.config.gui import gui_to_kohya, is_gui_config, read_gui_config
from loralab.errors import LoralabError

DATA = Path(__file__).parent / "data" / "kohya_ss"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def convert(name: str):
    return gui_to_kohya(load(name), name)


BUCKETS = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
LOCON = ["conv_dim=16", "conv_alpha=8", "rank_dropout=0.1", "module_dropout=0.1"]
PRODIGY_V4 = ["decouple=True", "weight_decay=0.45", "d_coef=2", "use_bias_correction=True", "safeguard_warmup=True"]
# What kohya runs with for each file, read from the JSON by lora_gui.py's rules (None = not sent). Columns:
# network_args, optimizer_type, optimizer_args, max_train_epochs, max_train_steps, learning_rate, unet_lr,
# text_encoder_lr, network_train_unet_only, lr_warmup_steps, resolution, buckets, mixed_precision, family.
EXPECTED = {
    # no LoRA_type, unet_lr or text_encoder_lr in the file: the GUI's defaults (Standard, 1e-4, 1e-4);
    # max_train_steps 0: the GUI counts `epoch` 4 epochs
    "Standard-AdamW.json": ([], "AdamW", None, 4, None, 1e-4, 1e-4, 1e-4, None, None, "512,512",
                            (True, 256, 2048, 64, True), "bf16", "sd1"),
    "Standard-AdamW8bit.json": ([], "AdamW8bit", None, 4, None, 1e-4, 1e-4, 1e-4, None, None, "512,512",
                                (True, 256, 2048, 64, True), "bf16", "sd1"),
    "SDXL-Standard-AdamW.json": ([], "AdamW", None, None, 1600, 1e-4, 1e-4, 1e-4, None, None, "1024,1024",
                                 (True, 256, 2048, 32, None), "fp16", "sdxl"),
    # Standard: conv_dim 64 is not sent; text_encoder_lr 0: UNet only
    "SDXL-Standard-Adafactor.json": ([], "AdamW8bit", None, None, 1600, 1e-3, 1e-3, None, True, None, "1024,1024",
                                     (True, 256, 2048, 32, None), "bf16", "sdxl"),
    # max_train_steps "" reads as 0: `epoch` 1 counts
    "locon-AdamW.json": (LOCON, "AdamW", None, 1, None, 5e-4, 1e-4, 1e-4, None, None, "512,512",
                         (True, 256, 2048, 64, True), "bf16", "sd1"),
    # max_train_steps missing: the GUI's 1600 (epoch is then not used); min/max_bucket_reso missing: 256 / 2048
    "locon-Prodigy.json": (LOCON, "Prodigy", ["decouple=True", "weight_decay=0.6", "betas=0.9,0.99",
                                              "use_bias_correction=True"], None, 1600, 1.0, 1.0, 1.0, None, None,
                           "512,512", (True, 256, 2048, 1, True), "bf16", "sd1"),
    "SDXL - LoRA AI_characters standard v1.1.json": ([], "AdamW", None, 50, None, 3e-5, 3e-5, 3e-5, None, None,
                                                     "1024,1024", (True, 256, 2048, 64, None), "fp16", "sdxl"),
    # additional_parameters: --network_train_unet_only (a command-line flag, kept as written)
    "SDXL - LoRA kudou-reira prodigy v4.0.json": ([], "Prodigy", PRODIGY_V4, None, 1600, 1.0, 1.0, 1.0, "true", None,
                                                  "1024,1024", (True, 256, 2048, 64, True), "bf16", "sdxl"),
    "sd15 - EDG_LoraOptiSettings.json": ([], "AdamW8bit", None, None, 1600, 1e-4, 1e-4, 5e-5, None, None, "512,650",
                                         (None, 256, 2048, 64.0, True), "bf16", "sd1"),
    "SDXL - LoRA adafactor v1.0.json": ([], "Adafactor", None, 30, 1600, 1.0, 1.0, 1.0, None, None, "1024,1024",
                                        (True, 64, 2048, 32, None), "bf16", "sdxl"),
}
# LyCORIS presets: (network_module, network_args) as lora_gui.py writes them
LYCORIS = {
    "loha-Prodigy.json": ("lycoris.kohya", ["preset=full", "conv_dim=4", "conv_alpha=4", "use_tucker=False",
                                            "rank_dropout=0", "bypass_mode=False", "dora_wd=False", "module_dropout=0",
                                            "use_scalar=False", "rank_dropout_scale=False", "train_norm=False",
                                            "algo=loha"]),
    "SDXL - LoHA AI_Characters v1.0.json": ("lycoris.kohya", ["preset=full", "conv_dim=16", "conv_alpha=16",
                                                              "use_tucker=False", "rank_dropout=0", "bypass_mode=False",
                                                              "dora_wd=False", "module_dropout=0", "use_scalar=False",
                                                              "rank_dropout_scale=False", "train_norm=False",
                                                              "algo=loha"]),
    "sd15 - EDG_LoConOptiSettings.json": ("lycoris.kohya", ["preset=full", "conv_dim=32", "conv_alpha=1",
                                                            "use_tucker=False", "rank_dropout=0",
                                                            "bypass_mode=False", "dora_wd=False",
                                                            "module_dropout=0", "use_scalar=False",
                                                            "rank_dropout_scale=False", "train_norm=False",
                                                            "algo=locon"]),
}
# Keys of these files that loralab refuses for good (build_config's message names them).
REFUSED = {"SDXL - LoRA kudou-reira prodigy v4.0.json": {"log_with"},  # "wandb"
           "SDXL - LoRA kudou-reira dadaptadam v1.0.json": {"log_with"},
           "SDXL - LoRA kudou-reira dadaptadam v1.1.json": {"log_with"},
           "locon-dadaptation-sdxl.json": {"bucket_reso_steps"},  # 1: buckets must map onto whole latent pixels
           "sd15 - EDG_LoraOptiSettings.json": {"resolution"},  # 650 is not a multiple of 8
           "loha-sd15.json": {"bucket_reso_steps"}, "lokr-sd15.json": {"bucket_reso_steps"},
           "sd15 - LoKR v1.0.json": {"bucket_reso_steps"}, "sd15 - LoKr v2.0.json": {"bucket_reso_steps"},
           "sd15 - EDG_LoHaOptiSettings.json": {"resolution"}, "sd15 - EDG_LoConOptiSettings.json": {"resolution"},
           "sd15 - GLoRA v1.0.json": {"network_args"},  # LyCORIS/LoKr with train_norm=True
           "sd15 - LoKr v1.1.json": {"network_args"}}  # the same


def test_the_copied_files_are_all_here():
    assert sorted(p.name for p in DATA.glob("*.json")) == sorted([*EXPECTED, *LYCORIS])
    assert "45088f04" in (DATA / "README.md").read_text() and (DATA / "LICENSE.md").is_file()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_file_converts_to_what_kohya_would_run(name):
    c = convert(name)
    (args, optimizer, optimizer_args, epochs, steps, lr, unet_lr, te_lr, unet_only, warmup, resolution, buckets,
     precision, family) = EXPECTED[name]
    k = c.keys
    assert c.problems == []
    assert (k["network_module"], k["network_args"]) == ("networks.lora", args)
    assert (k["optimizer_type"], k.get("optimizer_args")) == (optimizer, optimizer_args)
    assert (k.get("max_train_epochs"), k.get("max_train_steps")) == (epochs, steps)
    assert (k.get("learning_rate"), k.get("unet_lr"), k.get("text_encoder_lr")) == pytest.approx((lr, unet_lr, te_lr))
    assert (k.get("network_train_unet_only"), k.get("network_train_text_encoder_only")) == (unet_only, None)
    assert k.get("lr_warmup_steps") == warmup
    assert k["resolution"] == resolution and "max_resolution" not in k
    assert tuple(k.get(b) for b in BUCKETS) == buckets
    assert (k["mixed_precision"], c.expected_family) == (precision, family)
    assert "sdxl" not in k and "LoRA_type" not in k and "epoch" not in k


def test_the_kudou_reira_preset_keeps_its_additional_parameters_and_its_noise_group():
    c = convert("SDXL - LoRA kudou-reira prodigy v4.0.json")
    assert (c.keys["lr_scheduler_type"], c.keys["lr_scheduler_args"]) == ("CosineAnnealingLR", "T_max=30")
    assert c.keys["lr_scheduler"] == "cosine_with_restarts" and c.keys["noise_offset"] == pytest.approx(0.0357)
    assert "multires_noise_iterations" not in c.keys and c.keys["no_half_vae"] is True
    assert ("max_train_steps", "max_train_steps", 1600) in [m[:3] for m in c.mapped]  # missing: the GUI's default


@pytest.mark.parametrize("name", sorted(LYCORIS))
def test_lycoris_types_convert_as_the_gui_writes_them(name):
    c = convert(name)
    assert c.problems == []
    assert (c.keys["network_module"], c.keys["network_args"]) == LYCORIS[name]
    cfg = TrainConfig(network_module=c.keys["network_module"], network_args=c.keys["network_args"],
                      network_dim=c.keys["network_dim"], network_alpha=c.keys["network_alpha"])
    net = cfg.network_config()
    assert (net.algo, net.preset, net.conv_dim) == (LYCORIS[name][1][-1].split("=")[1], "full",
                                                    int(LYCORIS[name][1][1].split("=")[1]))


def _with_real_paths(keys: dict, prompt_text: str, tmp_path: Path) -> dict:
    """The conversion's keys with every path replaced by a file or folder in tmp_path."""
    keys = dict(keys)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    keys["pretrained_model_name_or_path"] = str(model)
    for key in ("train_data_dir", "output_dir", "logging_dir", "reg_data_dir", "resume"):
        if keys.get(key) or key == "train_data_dir":
            (tmp_path / key).mkdir(exist_ok=True)
            keys[key] = str(tmp_path / key)
    for key in ("vae", "network_weights"):
        if keys.get(key):
            (tmp_path / key).write_bytes(b"x")
            keys[key] = str(tmp_path / key)
    if prompt_text:
        (tmp_path / "prompt.txt").write_text(prompt_text, encoding="utf-8")
        keys["sample_prompts"] = str(tmp_path / "prompt.txt")
    return keys


def _refused_keys(message: str, keys: dict) -> set[str]:
    """The keys named by build_config's problems."""
    lines = [line.strip().removeprefix("- ") for line in message.splitlines()]
    lines = lines[1:] if len(lines) > 1 else lines
    return {next((k for k in sorted(keys, key=len, reverse=True) if line.startswith((f"{k}:", f"{k} ="))), line)
            for line in lines}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_build_config_takes_the_converted_keys(name, tmp_path):
    c = convert(name)
    keys = _with_real_paths(c.keys, c.prompt_text, tmp_path)
    try:
        cfg = build_config(None, keys)
    except LoralabError as e:
        assert _refused_keys(str(e), keys) == REFUSED.get(name, set()), str(e)
        return
    assert name not in REFUSED
    assert cfg.network_module == "networks.lora" and cfg.optimizer_type == c.keys["optimizer_type"]
    assert cfg.resolution == c.keys["resolution"] and cfg.mixed_precision == c.keys["mixed_precision"]


def test_every_key_of_a_full_gui_file_is_accounted_for():
    doc = load("Standard-AdamW.json")  # 172 fields, SD3/FLUX ones included
    c = gui_to_kohya(doc, "Standard-AdamW.json")
    seen = set(c.keys) | {m[0] for m in c.mapped} | {d[0] for d in c.dropped}
    off = {k for k, v in doc.items() if v in ("", False, None)}  # the GUI sends nothing for these
    assert set(doc) - seen - off == set()
    dropped = dict(c.dropped)
    for key in ("model_list", "num_processes", "gpu_ids", "multi_gpu", "save_as_bool", "dynamo_mode",
                "num_cpu_threads_per_process", "main_process_port", "extra_accelerate_launch_args"):
        assert key in dropped, key
    for key in ("flux1_checkbox", "sd3_checkbox", "t5xxl", "clip_l", "clip_g", "ae", "t5xxl_max_token_length"):
        assert "only when that model family is checked" in dropped[key]
    assert "text_encoder_lr" in dropped["learning_rate_te"] and "learning_rate_te2" in dropped
    assert dropped["noise_offset"].startswith("noise_offset_type is 'Multires'")
    assert (c.keys["multires_noise_iterations"], c.keys["multires_noise_discount"]) == (8, 0.2)


def test_sample_prompts_text_comes_back_and_nothing_is_written(tmp_path):
    doc = load("Standard-AdamW.json") | {"output_dir": str(tmp_path / "out")}
    c = gui_to_kohya(doc, "x.json")
    assert c.prompt_text == "a painting of man wearing a gas mask , by darius kawasaki\n"
    assert c.keys["sample_prompts"] == str(tmp_path / "out" / "sample" / "prompt.txt")
    assert not (tmp_path / "out").exists()
    assert "sample_prompts" not in gui_to_kohya(doc | {"sample_prompts": ""}, "x.json").keys


def test_a_newer_gui_file_reports_its_unknown_keys_together():
    doc = load("locon-AdamW.json") | {"some_future_option": 1, "another_new_field": "x"}
    c = gui_to_kohya(doc, "new.json")  # nothing raised
    unknown = [p for p in c.problems if "unknown kohya_ss GUI key" in p]
    assert [p.split(":")[0] for p in unknown] == ["some_future_option", "another_new_field"]
    assert all("(new.json)" in p for p in unknown) and c.keys["network_module"] == "networks.lora"


BASE = {"LoRA_type": "Standard", "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": 5e-5, "epoch": 2,
        "max_train_steps": 0, "lr_warmup": 0, "sdxl": False}


@pytest.mark.parametrize("fields, unet_only, te_only, unet_lr, te_lr", [
    ({}, None, None, 1e-4, 5e-5),
    ({"text_encoder_lr": 0}, True, None, 1e-4, None),  # TE 0: UNet only (resolve_network_train_flags)
    ({"unet_lr": 0}, None, True, None, 5e-5),  # UNet 0: text encoder only
    ({"unet_lr": 0, "text_encoder_lr": 0}, None, None, None, None),  # both 0: both at learning_rate
    ({"unet_lr": "0.0002", "text_encoder_lr": "abc"}, True, None, 2e-4, None),  # update_my_data: "abc" -> 0.0
])
def test_learning_rates_follow_the_gui(fields, unet_only, te_only, unet_lr, te_lr):
    c = gui_to_kohya(BASE | fields, "x.json")
    k = c.keys
    assert (k.get("network_train_unet_only"), k.get("network_train_text_encoder_only")) == (unet_only, te_only)
    assert (k.get("unet_lr"), k.get("text_encoder_lr")) == (unet_lr, te_lr) and k["learning_rate"] == 1e-4
    assert c.problems == []


def test_all_learning_rates_zero_is_refused_as_the_gui_does():
    c = gui_to_kohya(BASE | {"learning_rate": 0, "unet_lr": 0, "text_encoder_lr": 0}, "x.json")
    assert len(c.problems) == 1 and "Please input learning rate values" in c.problems[0]


@pytest.mark.parametrize("fields, warmup, steps", [
    ({"lr_warmup": 10}, 0.1, None),  # percent -> fraction of all steps
    ({"lr_warmup": "10"}, 0.1, None),
    ({"lr_warmup": 10, "lr_warmup_steps": 50}, 50, None),  # absolute steps win (resolve_lr_warmup_steps)
    ({"lr_warmup": None}, 0.1, None),  # null: the GUI's default 10 %
    ({"lr_warmup": 10, "dataset_config": "d.toml", "max_train_steps": 1000}, 100, 1000),  # percent of max_train_steps
    ({"lr_warmup": 10, "dataset_config": "d.toml"}, 0.1, 1600),  # no steps: sd-scripts' 1600, percent kept
])
def test_warmup_follows_the_gui(fields, warmup, steps):
    c = gui_to_kohya(BASE | {"lr_scheduler": "cosine"} | fields, "x.json")
    assert c.keys.get("lr_warmup_steps") == pytest.approx(warmup) and c.keys.get("max_train_steps") == steps
    if steps:
        assert "max_train_epochs" not in c.keys  # with a dataset_config the GUI cannot count epochs


def test_epochs_and_steps_precedence():
    assert gui_to_kohya(BASE | {"max_train_epochs": "7", "max_train_steps": 900}, "x").keys["max_train_epochs"] == 7
    k = gui_to_kohya(BASE | {"max_train_steps": 900}, "x").keys
    assert (k["max_train_steps"], k.get("max_train_epochs")) == (900, None)
    k = gui_to_kohya(BASE, "x").keys
    assert (k.get("max_train_steps"), k["max_train_epochs"]) == (None, 2)


def test_stop_text_encoder_training_is_dropped_as_the_gui_ignores_it_for_lora():
    c = gui_to_kohya(BASE | {"stop_text_encoder_training": 30}, "x.json")
    assert c.problems == [] and "stop_text_encoder_training" not in c.keys
    assert ("stop_text_encoder_training", "30%: the GUI ignores it for LoRA (\"not yet supported\"), so kohya trained "
            "the text encoder to the end, as loralab does; use stop_text_encoder_training (steps) to stop earlier"
            ) in c.dropped
    c = gui_to_kohya(BASE | {"stop_text_encoder_training_pct": 0, "stop_text_encoder_training": 0}, "x.json")
    assert c.problems == [] and "stop_text_encoder_training" not in c.keys


def test_other_model_families_are_refused_and_their_keys_dropped_when_off():
    c = gui_to_kohya(BASE | {"flux1_checkbox": True, "LoRA_type": "Flux1", "t5xxl": "t5.safetensors"}, "f.json")
    assert len(c.problems) == 1 and "loralab trains SD 1.x/2.x and SDXL" in c.problems[0]
    assert "flux1_checkbox" in c.problems[0] and "t5xxl" not in c.keys
    c = gui_to_kohya(BASE | {"sd3_checkbox": False, "clip_g": "", "t5xxl_lr": 0.0}, "x.json")
    assert c.problems == [] and {"sd3_checkbox", "clip_g", "t5xxl_lr"} <= set(dict(c.dropped))


@pytest.mark.parametrize("attention, key", [("xformers", "xformers"), ("sdpa", "sdpa"), (True, "xformers"),
                                            ("none", None), (False, None)])
def test_attention_flag(attention, key):
    k = gui_to_kohya(BASE | {"xformers": attention}, "x.json").keys
    assert [a for a in ("xformers", "sdpa") if a in k] == ([key] if key else [])


def test_network_args_as_the_gui_writes_them():
    c = gui_to_kohya(BASE | {"LoRA_type": "Kohya LoCon", "conv_dim": 8, "conv_alpha": 4, "rank_dropout": 0,
                             "down_lr_weight": "sine", "block_dims": "", "loraplus_lr_ratio": 16}, "x.json")
    assert c.keys["network_args"] == ["conv_dim=8", "conv_alpha=4", "down_lr_weight=sine", "loraplus_lr_ratio=16"]
    c = gui_to_kohya(BASE | {"LoRA_type": "LoCon"}, "x.json")  # update_my_data: the old "LoCon" is LyCORIS's
    assert c.problems == [] and c.keys["network_module"] == "lycoris.kohya" and "algo=locon" in c.keys["network_args"]
    c = gui_to_kohya(BASE | {"LoRA_type": "LyCORIS/LoKr", "factor": 8, "dora_wd": True}, "x.json")
    assert {"factor=8", "dora_wd=True", "use_cp=False", "decompose_both=False", "algo=lokr"} <= set(c.keys["network_args"])
    c = gui_to_kohya(BASE | {"LoRA_type": "Kohya DyLoRA", "unit": 2, "conv_dim": 0}, "x.json")
    assert (c.keys["network_module"], c.keys["network_args"]) == ("networks.dylora", ["conv_alpha=1", "unit=2"])  # conv_alpha: the GUI default
    for lora_type in ("LyCORIS/iA3", "LyCORIS/GLoRA", "LyCORIS/Diag-OFT", "Kohya LoKr"):
        c = gui_to_kohya(BASE | {"LoRA_type": lora_type}, "x.json")
        assert len(c.problems) == 1 and f"LoRA_type {lora_type!r} is not supported yet" in c.problems[0]


def test_gui_value_rules():
    c = gui_to_kohya(BASE | {"max_grad_norm": 0, "seed": "", "caption_extension": "", "v2": True,
                             "noise_offset_type": "Original", "noise_offset": 0.1, "multires_noise_iterations": 6,
                             "optimizer": None, "use_8bit_adam": True, "clip_skip": "2"}, "x.json")
    k = c.keys
    assert "max_grad_norm" not in k  # 0 is not sent: kohya clips at 1.0
    assert ("max_grad_norm", "max_grad_norm", 1.0) in [m[:3] for m in c.mapped]
    assert "seed" not in k and k["caption_extension"] == ".caption" and k["clip_skip"] == 2
    assert (k["v2"], c.expected_family) == (True, "sd2") and k["optimizer_type"] == "AdamW8bit"
    assert k["noise_offset"] == 0.1 and "multires_noise_iterations" not in k


def test_bad_args_and_additional_parameters_are_problems_not_exceptions():
    c = gui_to_kohya(BASE | {"optimizer_args": "betas=0.9, 0.99", "additional_parameters": '--foo "bar'}, "x.json")
    assert [p.split(" ")[0] for p in c.problems] == ["optimizer_args", "additional_parameters"]
    c = gui_to_kohya(BASE | {"additional_parameters": "--max_grad_norm=0 --network_train_unet_only"}, "x.json")
    assert (c.keys["max_grad_norm"], c.keys["network_train_unet_only"]) == ("0", "true")
    assert gui_to_kohya([1, 2], "x.json").problems[0].startswith("x.json: not a kohya_ss GUI config")
    c = gui_to_kohya(BASE | {"noise_offset_type": "Multires", "noise_offset": 1.5}, "x.json")
    assert len(c.problems) == 1 and c.problems[0].startswith("noise_offset = 1.5")  # the GUI checks it anyway


def test_files(tmp_path):
    assert is_gui_config("a/b.JSON") and not is_gui_config("run.toml")
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(LoralabError, match="not valid JSON"):
        read_gui_config(bad)
    assert read_gui_config(DATA / "locon-AdamW.json").keys["network_args"] == LOCON


def _gui_file(tmp_path: Path, ckpt: Path, img: Path, **changes) -> Path:
    """The GUI's own Standard-AdamW.json with only its paths (and `changes`) replaced."""
    doc = load("Standard-AdamW.json")
    doc.update(pretrained_model_name_or_path=str(ckpt), train_data_dir=str(img), output_dir=str(tmp_path / "out"),
               logging_dir="", max_resolution="64,64", min_bucket_reso=64, bucket_no_upscale=False, **changes)
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(doc))
    return path


def test_train_dry_run_reads_a_gui_json_as_the_gui_would_run_it(tmp_path, tiny_sd1_checkpoint):
    import subprocess
    import sys

    from test_train import make_dataset

    img, _ = make_dataset(tmp_path, reg=False)
    path = _gui_file(tmp_path, tiny_sd1_checkpoint, img, sample_prompts="a red thing --w 64 --h 64\nblue --w 64 --h 64")
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--config", str(path), "--dry-run"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for line in (f"    max_train_epochs                   = 4  [{path}]",  # `epoch` (max_train_steps 0)
                 f"    optimizer_type                     = 'AdamW'  [{path}]", f"    min_snr_gamma                      = 10.0  [{path}]",
                 f"    multires_noise_iterations          = 8  [{path}]",  # noise_offset_type Multires
                 "    noise_offset                       = 0.0  [default]",  # … so the Original group is not sent
                 f"    resolution                         = '64,64'  [{path}]",
                 "  sample prompts: 2 (from ", "batch size 4, 4 batches per epoch, 4 steps per epoch, 4 epochs, 16 steps"):
        assert line in out, line
    assert "xformers" in r.stderr and "no effect in loralab" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing written where the user's files are

    sdxl = _gui_file(tmp_path, tiny_sd1_checkpoint, img, sdxl=True)
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--config", str(sdxl), "--dry-run"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert (f"error: sdxl / v2 ({sdxl}): the GUI config is for SDXL, but {tiny_sd1_checkpoint} is SD 1.x; fix the "
            "checkboxes or pick the model the config was made for") in r.stderr


def test_config_import_of_a_gui_json(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run.toml"
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "config", "import", str(DATA / "Standard-AdamW8bit.json"),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "  - epoch -> max_train_epochs = 4" in r.stdout and "  - model_list: " in r.stdout
    assert "the config's sample prompts are text, not a file" in r.stderr
    text = out.read_text()
    assert 'optimizer_type = "AdamW8bit"' in text and "max_train_epochs = 4" in text and "model_list" not in text.split(
        "\n[", 1)[1]


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - set(REFUSED)))
def test_the_toml_the_gui_writes_for_sd_scripts_loads_the_same(name, tmp_path):
    """The GUI runs sd-scripts with a TOML of the keys it sends (lora_gui.py's config_toml_data, with "", 0,
    false and None left out): that file, written from the conversion, loads to the same config."""
    import dataclasses

    from loralab.config.convert import toml_value

    c = convert(name)
    keys = _with_real_paths(c.keys, c.prompt_text, tmp_path)
    toml = tmp_path / "config_lora.toml"
    toml.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items() if v not in ("", None, False, 0)))
    from_file, from_keys = build_config(toml), build_config(None, {k: v for k, v in keys.items()
                                                                     if v not in ("", None, False, 0)})
    assert dataclasses.asdict(from_file) == dataclasses.asdict(from_keys)


def _all_gui_lora_presets() -> list[Path]:
    """Every LoRA preset of the GUI (presets/lora/*.json): the ones the table above checks, and the rest."""
    return sorted([DATA / n for n in [*EXPECTED, *LYCORIS] if " - " in n] + list((DATA / "presets").glob("*.json")))


def test_every_gui_lora_preset_is_here():
    assert len(_all_gui_lora_presets()) == 31  # presets/lora/*.json at kohya_ss 45088f04


@pytest.mark.parametrize("path", _all_gui_lora_presets(), ids=lambda p: p.name)
def test_every_gui_lora_preset_dry_runs_or_says_why_not(path, tmp_path, tiny_sd1_checkpoint):
    """Each preset, with only its paths replaced (and the tiny model and dataset), goes through everything a
    run checks before the model loads (`--dry-run`): LoRA / Kohya LoCon / LyCORIS LoCon, LoHa, LoKr presets pass;
    the other LyCORIS types and FLUX give one "not supported" problem; a preset whose value loralab refuses for
    good names that key (LoKr presets with train_norm=True: network_args train_norm)."""
    from loralab.train.dry_run import dry_run
    from test_train import make_dataset

    doc = json.loads(path.read_text(encoding="utf-8"))
    c = gui_to_kohya(doc, path.name)
    lora_type = doc.get("LoRA_type", "Standard")
    from loralab.config.gui import LYCORIS_TYPES

    if (lora_type.startswith("LyCORIS/") and lora_type not in LYCORIS_TYPES) or lora_type == "Flux1" \
            or doc.get("flux1_checkbox"):
        assert len(c.problems) >= 1 and all("not supported yet" in p or "loralab trains SD 1.x/2.x and SDXL" in p
                                            for p in c.problems), c.problems
        return
    assert c.problems == []
    img, _ = make_dataset(tmp_path)
    keys = _with_real_paths(c.keys, c.prompt_text, tmp_path)
    keys.update(pretrained_model_name_or_path=str(tiny_sd1_checkpoint), train_data_dir=str(img), reg_data_dir="")
    try:
        report = dry_run(build_config(None, keys), {})
    except LoralabError as e:
        assert _refused_keys(str(e), keys) == REFUSED.get(path.name), str(e)
        return
    assert path.name not in REFUSED
    assert report.endswith("dry run: the config and the dataset are valid; nothing was loaded or written.")
