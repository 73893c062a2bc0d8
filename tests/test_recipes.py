"""Recipes and callbacks: a method of its own trains through `fit` unchanged; a callback ends a run cleanly;
the kohya keys that reach the step (ip noise, token warmup) and the option objects of the config."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loralab.config import TrainConfig, _f, build_config, parse_resolution
from loralab.errors import LoralabError
from loralab.recipes.lora import train
from loralab.train.callbacks import Callback
from loralab.train.loop import fit
from loralab.train.recipe import Recipe
from loralab.train.run import Run
from loralab.train.step import batch_latents
from test_train import base_cfg, make_dataset


@dataclass
class TowardsTargetConfig(TrainConfig):
    target_value: float = _f(0.5, "the value every UNet output is pulled towards", group="towards_target")

    def validate(self) -> None:
        if not -1 <= self.target_value <= 1:
            raise LoralabError(f"target_value: must be in [-1, 1], got {self.target_value}")


class TowardsTarget(Recipe):
    """UNet LoRA only; the loss pulls the UNet's output at t = 500 towards a constant."""
    name = "towards_target"

    def param_groups(self, run: Run) -> list[dict]:
        return run.network.param_groups(unet_lr=run.cfg.learning_rate, text_encoder_lr=0,
                                        learning_rate=run.cfg.learning_rate)

    def loss(self, run, batch, rng, generator):
        latents = batch_latents(run, batch, [False] * len(batch))
        with torch.no_grad():
            cond = run.model.text_encoders[0](torch.zeros(len(batch), 77, dtype=torch.long)).last_hidden_state
        t = torch.full((len(batch),), 500, dtype=torch.long)
        pred = run.model.unet(latents, t, cond).sample
        return torch.nn.functional.mse_loss(pred, torch.full_like(pred, run.cfg.target_value))

    def extra_tensors(self, run):
        return {"towards_target.value": torch.tensor([run.cfg.target_value])}

    def extra_metadata(self, run):
        return {"loralab.recipe": self.name}


def test_a_recipe_of_its_own_trains_through_fit(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 2),), reg=False)
    toml = tmp_path / "run.toml"
    toml.write_text("target_value = 0.25\n")
    cfg = build_config(toml, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_steps=12,
                                      learning_rate="1e-2", network_dim=8, network_alpha=8, cache_latents="true"),
                       config_class=TowardsTargetConfig)
    assert cfg.target_value == 0.25
    recipe = TowardsTarget()
    result = fit(recipe.prepare(cfg), recipe)
    losses = [json.loads(line)["loss/current"] for line in result.log_file.read_text().splitlines()
              if '"kind": "step"' in line]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]
    sd = load_file(str(result.final_file))
    assert sd["towards_target.value"].item() == 0.25
    assert all(t.abs().sum() == 0 for k, t in sd.items() if k.startswith("lora_te_") and "lora_up" in k)
    assert any(t.abs().sum() > 0 for k, t in sd.items() if k.startswith("lora_unet_") and "lora_up" in k)
    with safe_open(str(result.final_file), "pt") as f:
        assert f.metadata()["loralab.recipe"] == "towards_target"
    with pytest.raises(LoralabError, match="target_value"):
        build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "o2", target_value=3),
                     config_class=TowardsTargetConfig)
    with pytest.raises(LoralabError, match="target_value: unknown key"):
        build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "o3", target_value=0.1))


def test_a_callback_stops_the_run_cleanly_after_an_epoch(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 2),), reg=False)
    seen = []

    class StopAfterFirstEpoch(Callback):
        def on_step_end(self, run):
            seen.append(run.global_step)

        def on_epoch_end(self, run):
            run.log.validation(run.global_step, run.epoch + 1, {"loss/validation/epoch_average": 0.5})
            if run.epoch == 0:
                run.stop("validation loss stopped improving")

    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_epochs=3,
                                      save_every_n_epochs=1, save_state="true", train_batch_size=1))
    result = train(cfg, [StopAfterFirstEpoch()])
    out = tmp_path / "out"
    assert result.stop_reason == "validation loss stopped improving" and result.epochs == 1
    assert seen == [1, 2, 3, 4] and result.global_step == 4  # 2 images x 2 repeats, batch 1
    assert sorted(p.name for p in out.iterdir()) == [
        "lora-000001-state", "lora-000001.safetensors", "lora-state", "lora.safetensors", "train_log.jsonl"]
    epoch1, final = load_file(str(out / "lora-000001.safetensors")), load_file(str(out / "lora.safetensors"))
    assert epoch1.keys() == final.keys() and all(torch.equal(epoch1[k], final[k]) for k in epoch1)
    with safe_open(str(out / "lora-000001.safetensors"), "pt") as f:
        assert f.metadata()["ss_epoch"] == "1" and f.metadata()["ss_steps"] == "4"
    state = json.loads((out / "lora-000001-state" / "train_state.json").read_text())
    assert state["epoch"] == 1 and state["global_step"] == 4
    records = [json.loads(line) for line in result.log_file.read_text().splitlines()]
    assert [r["reason"] for r in records if r.get("event") == "stopped"] == ["validation loss stopped improving"]
    assert [r["kind"] for r in records if r["kind"] == "validation"] == ["validation"]
    assert records[-1]["event"] == "done"


def test_ip_noise_gamma_and_token_warmup_reach_the_step(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 1),), reg=False)
    common = dict(max_train_steps=2, train_batch_size=1, network_train_unet_only="true")
    plain = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "a", **common)))
    perturbed = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "b", ip_noise_gamma=0.5,
                                                  **common)))
    assert plain.last_loss != perturbed.last_loss
    with safe_open(str(perturbed.final_file), "pt") as f:
        md = f.metadata()
    assert md["ss_ip_noise_gamma"] == "0.5" and md["ss_ip_noise_gamma_random_strength"] == "False"
    with safe_open(str(plain.final_file), "pt") as f:
        assert "ss_ip_noise_gamma" not in f.metadata()

    # token warmup: at step 0 only token_warmup_min flexible tags are trained (kohya's rule)
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "c", token_warmup_min=1,
                                      token_warmup_step=10, keep_tokens=1, **common))
    from loralab.data.captions import process_caption

    assert process_caption("alpha, red, blue background, tag0", cfg.caption_options(), epoch=1,
                           rng=random.Random(0), step=0, max_train_steps=2) == "alpha, red"
    with pytest.raises(LoralabError, match="token_warmup_step"):
        build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "d", token_warmup_step=10,
                                    cache_text_encoder_outputs="true", **common))


def test_config_hands_out_option_objects():
    cfg = TrainConfig(resolution="768,512", enable_bucket=True, network_dim=8, network_alpha=4,
                      network_args=["conv_dim=4", "rank_dropout=0.1"], shuffle_caption=True, keep_tokens=2,
                      noise_offset=0.05, network_train_unet_only=True)
    assert cfg.caption_options().keep_tokens == 2 and cfg.caption_options().shuffle_caption
    net = cfg.network_config()
    assert (net.dim, net.alpha, net.conv_dim, net.rank_dropout, net.train_text_encoder) == (8, 4, 4, 0.1, False)
    assert cfg.bucket_options()["resolution"] == (768, 512) and cfg.bucket_options()["enable_bucket"]
    assert cfg.noise_options()["noise_offset"] == 0.05 and cfg.noise_options()["ip_noise_gamma"] is None
    assert not cfg.trains_text_encoder()
    assert TrainConfig(text_encoder_lr=0).trains_text_encoder() is False
    assert TrainConfig().trains_text_encoder() is True


@pytest.mark.parametrize("text,wh", [("512", (512, 512)), ("768,512", (768, 512)), ("768x512", (768, 512)),
                                     (" 640 X 448 ", (640, 448)), (512, (512, 512)), ([704, 512], (704, 512))])
def test_one_resolution_rule(text, wh):
    assert parse_resolution(text) == wh


def test_bad_resolution_says_what_to_write():
    with pytest.raises(LoralabError, match="'W,H' or a single size"):
        parse_resolution("big")
