"""Masked loss (issue 11): mask images of a dataset_config subset (conditioning_data_dir) and alpha_mask; the
masks go through their image's resize, crop and flip, are cached with the latents, and weigh the loss."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loralab.config import build_config
from loralab.data.augment import PixelAugment
from loralab.data.buckets import random_crop_box
from loralab.data.dataset import FolderDataset, scan_folder_dataset
from loralab.data.dataset_config import dataset_config_problems, read_dataset_config, scan_dataset_config
from loralab.data.images import prepare_image
from loralab.data.latents import cache_latents
from loralab.data.masks import mask_pixels, prepare_mask
from loralab.errors import LoralabError
from loralab.recipes.lora import train
from loralab.train.logs import read_train_log
from loralab.train.noise import LossOptions, apply_loss_mask, loss_per_sample
from test_latents import CountingEncoder
from test_train import base_cfg


def write_pair(folder: Path, mask_folder: Path | None, name: str, size=(64, 64), seed=0, mask=None,
               alpha=None) -> None:
    """An image `name`.png with its caption (RGBA when `alpha` is given) and, in `mask_folder`, its mask."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA") if alpha is not None else Image.fromarray(rgb)
    img.save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(f"{name}, red")
    if mask_folder is not None:
        mask_folder.mkdir(parents=True, exist_ok=True)
        m = mask if mask is not None else rng.integers(0, 2, (size[1], size[0]), dtype=np.uint8) * 255
        Image.fromarray(m.astype(np.uint8), "L").save(mask_folder / f"{name}.png")


def toml_with_masks(tmp_path: Path, images: Path, masks: Path | None, extra: str = "", **dataset) -> Path:
    keys = "".join(f"{k} = {v}\n" for k, v in {"resolution": 64, **dataset}.items())
    cond = f'  conditioning_data_dir = "{masks}"\n' if masks else ""
    path = tmp_path / "ds.toml"
    path.write_text(f'[[datasets]]\n{keys}  [[datasets.subsets]]\n  image_dir = "{images}"\n{cond}{extra}')
    return path


# ----------------------------------------------------------------------------------------- the loss itself


def test_apply_loss_mask_is_the_area_resized_mask_times_the_loss():
    loss = torch.ones(1, 4, 2, 2)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1.0  # left half
    mask[..., :4, 4:6] = 1.0  # a quarter of the top-right latent pixel's 4x4 block... half of it
    out = apply_loss_mask(loss, mask)
    assert out.shape == (1, 4, 2, 2)
    assert torch.equal(out[0, 0], torch.tensor([[1.0, 0.5], [1.0, 0.0]]))
    assert torch.equal(apply_loss_mask(loss, mask[:, 0]), out)  # (B, H, W) masks too


def test_masked_out_pixels_give_no_gradient_and_do_not_change_the_loss():
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 32, 32)  # pixel size: 4x the latents
    mask[:, :, :, :16] = 1.0  # the left half counts
    per_sample = loss_per_sample(pred, target, mask=mask)
    per_sample.mean().backward()
    grad = pred.grad
    assert torch.count_nonzero(grad[..., 4:]) == 0  # right half: not a single gradient
    assert torch.count_nonzero(grad[..., :4]) == grad[..., :4].numel()
    # the value: the mean over all latent pixels of the masked squared error (sd-scripts: not re-normalised)
    expected = ((pred.detach() - target) ** 2)[..., :4].sum(dim=(1, 2, 3)) / (4 * 8 * 8)
    assert torch.allclose(per_sample.detach(), expected)
    # whatever the target holds where the mask is 0, the loss is the same
    other = target.clone()
    other[..., 4:] = 100.0
    assert torch.equal(loss_per_sample(pred.detach(), other, mask=mask), per_sample.detach())


def test_mask_then_prior_weight_then_min_snr_in_sd_scripts_order():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.manual_seed(1)
    pred, target = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    mask = torch.rand(2, 1, 16, 16)
    t = torch.tensor([10, 700])
    weights = torch.tensor([1.0, 0.5])
    got = loss_per_sample(pred, target, loss_weights=weights, timesteps=t, scheduler=sched,
                          options=LossOptions(min_snr_gamma=5.0), mask=mask)
    masked = ((pred - target) ** 2 * torch.nn.functional.interpolate(mask, size=(4, 4), mode="area")).mean((1, 2, 3))
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    assert torch.allclose(got, masked * weights * torch.clamp(snr, max=5.0) / snr, rtol=1e-5)


# ----------------------------------------------------------------------------------------- masks with their images


def test_mask_goes_through_its_images_resize_crop_and_flip(tmp_path):
    """An image whose three channels equal its mask: after any bucket resize, crop and flip, the training
    pixels and the mask must be the same numbers."""
    images, masks = tmp_path / "img", tmp_path / "masks"
    rng = np.random.default_rng(3)
    for i, size in enumerate([(96, 64), (64, 100), (50, 50)]):
        m = (rng.random((size[1] // 4, size[0] // 4)) > 0.5).repeat(4, 0).repeat(4, 1)
        m = np.pad(m, ((0, size[1] - m.shape[0]), (0, size[0] - m.shape[1]))).astype(np.uint8) * 255
        images.mkdir(exist_ok=True)
        Image.fromarray(np.dstack([m, m, m])).save(images / f"{i}.png")
        write_pair(tmp_path / "unused", masks, str(i), size=size, mask=m)
    dc = read_dataset_config(toml_with_masks(tmp_path, images, masks, enable_bucket="true", min_bucket_reso=32,
                                             max_bucket_reso=128, bucket_reso_steps=16), {"masked_loss": True})
    (subsets,) = scan_dataset_config(dc)
    ds = FolderDataset(subsets, resolution=(64, 64), batch_size=1, enable_bucket=True, min_bucket_reso=32,
                       max_bucket_reso=128, bucket_reso_steps=16)
    assert any(s.choice.resized != s.choice.bucket for s in ds.samples)  # some are cropped
    rnd = random.Random(0)
    for s in ds.samples:
        assert s.entry.mask_path == masks / s.entry.path.name
        for flip in (False, True):
            box = random_crop_box(s.choice.resized, s.choice.bucket, rnd)
            for crop in (None, box):
                pixels = prepare_image(s.entry.path, s.choice, flip=flip, augment=PixelAugment(crop_ltrb=crop))
                mask = prepare_mask(s.entry, s.choice, flip=flip, crop_ltrb=crop)
                assert mask.shape == pixels.shape[1:] == (s.choice.bucket[1], s.choice.bucket[0])
                assert torch.allclose(mask * 2 - 1, pixels[0], atol=1e-6)
                assert 0 < mask.mean() < 1


def test_alpha_mask_uses_the_alpha_channel_and_counts_images_without_it(tmp_path, caplog):
    sub = tmp_path / "train" / "3_x"
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, :32] = 255
    write_pair(sub, None, "a", alpha=alpha)
    write_pair(sub, None, "b")  # RGB: no alpha
    write_pair(sub, None, "c")
    with caplog.at_level("WARNING"):
        subsets = scan_folder_dataset(tmp_path / "train", alpha_mask=True)
    assert caplog.text.count("alpha_mask: 2 of the images have no alpha channel (b.png, c.png)") == 1
    ds = FolderDataset(subsets, resolution=(64, 64), batch_size=1)
    by_name = {s.entry.path.stem: s for s in ds.samples}
    a = mask_pixels(by_name["a"].entry, by_name["a"].choice)
    assert (a[:, :32] == 255).all() and (a[:, 32:] == 0).all()
    assert (mask_pixels(by_name["a"].entry, by_name["a"].choice, flip=True)[:, 32:] == 255).all()
    assert (mask_pixels(by_name["b"].entry, by_name["b"].choice) == 255).all()
    # without alpha_mask no image has a mask
    (plain,) = scan_folder_dataset(tmp_path / "train")
    assert not plain.alpha_mask and all(e.mask_path is None for e in plain.images)


# ----------------------------------------------------------------------------------------- bad input


def test_missing_mask_wrong_size_and_extra_masks(tmp_path, caplog):
    images, masks = tmp_path / "img", tmp_path / "masks"
    for name in ("one", "two", "three"):
        write_pair(images, masks, name)
    (masks / "two.png").unlink()
    toml = toml_with_masks(tmp_path, images, masks)
    dc = read_dataset_config(toml, {"masked_loss": True})
    with pytest.raises(LoralabError) as e:
        scan_dataset_config(dc)
    text = str(e.value)
    assert text.startswith(f"dataset_config: {toml}: conditioning_data_dir: {masks}: no mask for 1 of the 3 images")
    assert "two.png" in text and str(masks / "two.png") in text
    write_pair(tmp_path / "elsewhere", masks, "two", size=(64, 48))  # a mask of another size
    with pytest.raises(LoralabError, match=r"a mask must have the size of its image: .*two.png is 64x48 but its "
                                           r"image two.png is 64x64"):
        scan_dataset_config(dc)
    write_pair(tmp_path / "elsewhere", masks, "two")
    write_pair(tmp_path / "elsewhere", masks, "stray")
    with caplog.at_level("WARNING"):
        (subsets,) = scan_dataset_config(dc)
    assert "1 mask images have no image" in caplog.text and "stray.png" in caplog.text
    assert all(e.mask_path is not None for e in subsets[0].images)


def test_mask_keys_refused_where_they_cannot_work(tmp_path, tiny_sd1_checkpoint):
    images, masks = tmp_path / "img", tmp_path / "masks"
    write_pair(images, masks, "one")
    with_masks = toml_with_masks(tmp_path, images, masks)
    (p,) = dataset_config_problems(with_masks, {"masked_loss": False})
    assert "[[datasets]] #1 subset #1: conditioning_data_dir: mask images are used only with masked_loss = true" in p
    assert dataset_config_problems(with_masks, {}) == []  # the analysis commands: no training config, no rule
    both = toml_with_masks(tmp_path, images, masks, extra="  alpha_mask = true\n")
    (p,) = dataset_config_problems(both, {"masked_loss": True})
    assert "conditioning_data_dir and alpha_mask: a subset's masks come from one of them" in p
    missing = toml_with_masks(tmp_path, images, tmp_path / "nowhere")
    (p,) = dataset_config_problems(missing, {"masked_loss": True})
    assert f"conditioning_data_dir: {tmp_path / 'nowhere'} does not exist" in p
    plain = toml_with_masks(tmp_path, images, None)
    (p,) = dataset_config_problems(plain, {"masked_loss": True})
    assert p.startswith(f"dataset_config: {plain}: masked_loss: no [[datasets.subsets]] gives masks: ")
    assert dataset_config_problems(plain, {"masked_loss": True, "alpha_mask": True}) == []  # the config's alpha_mask
    # the training config, before any model loads
    out = tmp_path / "out"
    with pytest.raises(LoralabError, match="^masked_loss: there are no masks to apply. A train_data_dir folder"):
        build_config(None, base_cfg(tiny_sd1_checkpoint, tmp_path, out, masked_loss="true"))
    with pytest.raises(LoralabError, match="^conditioning_data_dir = .*: sd-scripts' train_network.py does not read"):
        build_config(None, base_cfg(tiny_sd1_checkpoint, tmp_path, out, conditioning_data_dir=masks))
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, tmp_path, out, masked_loss="true",
                                      alpha_mask="true"))
    assert cfg.masked_loss and cfg.alpha_mask


# ----------------------------------------------------------------------------------------- the latent cache


def test_masks_cached_with_latents_flipped_on_use_and_rebuilt_when_they_change(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "masks"
    for i in range(3):
        write_pair(images, masks, f"i{i}", seed=i)
    toml = toml_with_masks(tmp_path, images, masks, flip_aug="true")

    def samples():
        (subsets,) = scan_dataset_config(read_dataset_config(toml, {"masked_loss": True}))
        return FolderDataset(subsets, resolution=(64, 64), batch_size=1).samples

    def build(ss):
        enc = CountingEncoder()
        cache = cache_latents(ss, enc, to_disk=True, flip_aug=True, vae_id="v", progress=False)
        return cache, enc

    ss = samples()
    cache, enc = build(ss)
    assert enc.images == 6  # 3 images and their flips
    for s in ss:
        for flip in (False, True):
            assert torch.equal(cache.get_mask(s, flipped=flip), prepare_mask(s.entry, s.choice, flip=flip))
    again, enc = build(samples())
    assert enc.images == 0 and again.num_loaded == 3
    assert torch.equal(again.get_mask(ss[0], flipped=True), cache.get_mask(ss[0], flipped=True))
    # a changed mask file: that image's cache file is rebuilt, the others are reused
    new = np.zeros((64, 64), dtype=np.uint8)
    new[:8] = 255
    Image.fromarray(new, "L").save(masks / "i1.png")
    ss = samples()
    changed, enc = build(ss)
    assert enc.images == 2 and changed.num_loaded == 2
    s1 = next(s for s in ss if s.entry.path.stem == "i1")
    assert torch.equal(changed.get_mask(s1), torch.from_numpy(new).float() / 255)
    # without masks the same files serve (their latents did not change); no sample has a mask
    toml.write_text(toml.read_text().replace(f'  conditioning_data_dir = "{masks}"\n', ""))
    (subsets,) = scan_dataset_config(read_dataset_config(toml, {}))
    plain = FolderDataset(subsets, resolution=(64, 64), batch_size=1).samples
    unmasked, enc = build(plain)
    assert enc.images == 0 and torch.equal(unmasked.get_mask(plain[0]), torch.ones(64, 64))


# ----------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("source", ["files", "alpha"])
def test_training_with_all_black_masks_learns_nothing(tmp_path, tiny_sd1_checkpoint, source):
    """Every mask 0: the loss is 0, so lora_up (zero at the start) gets no gradient and stays 0; the same run
    with white masks moves it. Through `loralab train`'s code: mask files with cached latents and flips;
    alpha masks made at each step, with random crops and a validation loss."""
    ups = {}
    size = (64, 64) if source == "files" else (64, 80)
    for value in (0, 255):
        root = tmp_path / f"{source}{value}"
        images, masks = root / "img" / "2_x", root / "masks"
        full = np.full((size[1], size[0]), value, dtype=np.uint8)
        for i in range(3):
            write_pair(images, masks if source == "files" else None, f"i{i}", size=size, seed=i, mask=full,
                       alpha=full if source == "alpha" else None)
        keys = dict(max_train_steps=2, flip_aug="true", masked_loss="true")
        if source == "files":
            keys.update(dataset_config=toml_with_masks(root, images, masks, num_repeats=2), cache_latents="true")
        else:
            keys.update(alpha_mask="true", random_crop="true", validation_split=0.4)
        result = train(build_config(None, base_cfg(tiny_sd1_checkpoint, root / "img", root / "out", **keys)))
        sd = load_file(str(result.final_file))
        ups[value] = max(float(v.abs().max()) for k, v in sd.items() if "lora_up" in k)
        if source == "alpha":  # the validation loss is masked too (sd-scripts: the same process_batch)
            (val,) = [r for r in read_train_log(result.log_file) if r["kind"] == "validation"]
            assert (val["loss/validation/epoch_average"] == 0.0) == (value == 0)
    assert ups[0] == 0.0
    assert ups[255] > 0.0
