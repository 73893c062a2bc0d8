"""Sliders / LECO (`recipes/slider.py`, `recipes/prompts.py`): the loss target, the prompt file, a short real
slider training on the lab model whose file loads at −1 and +1 and moves the size the right way, and the
messages of bad slider configs through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.lab.model import lab_model_path
from loralab.recipes import recipe_for
from loralab.recipes.prompts import SliderPrompt, read_prompts
from loralab.recipes.slider import SliderRecipe, slider_target

SIZE_PAIRS = [("red", "circle", "blue"), ("green", "square", "white"), ("yellow", "star", "black"),
              ("blue", "heart", "gray"), ("white", "cross", "green"), ("purple", "triangle", "yellow")]
HELD = [("orange", "circle", "black"), ("black", "square", "yellow"), ("green", "heart", "white"),
        ("red", "triangle", "gray"), ("white", "star", "blue"), ("yellow", "cross", "green")]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def size_slider_toml(path: Path) -> Path:
    entries = []
    for colour, shape, bg in SIZE_PAIRS:
        x = f"{colour} {shape}, {bg} background"
        entries.append(f'[[prompts]]\ntarget = "{x}"\npositive = "{x}, large"\nnegative = "{x}, small"\n'
                       f'neutral = "{x}"\naction = "enhance"\nguidance_scale = 2.0\nbidirectional = true\n')
    return write(path, "\n".join(entries))


# ------------------------------------------------------------------------------------------ the loss target
def test_slider_target_matches_the_explicit_formula():
    g = torch.Generator().manual_seed(0)
    neutral, positive, negative = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    for eta in (0.0, 1.0, 4.0):
        enhance = slider_target(neutral, positive, negative, eta, +1.0)
        erase = slider_target(neutral, positive, negative, eta, -1.0)
        for i in range(2):
            for c in range(4):
                for y in range(3):
                    for x in range(3):
                        d = positive[i, c, y, x].item() - negative[i, c, y, x].item()
                        assert enhance[i, c, y, x].item() == pytest.approx(neutral[i, c, y, x].item() + eta * d, abs=1e-5)
                        assert erase[i, c, y, x].item() == pytest.approx(neutral[i, c, y, x].item() - eta * d, abs=1e-5)
    # η = 0 keeps the neutral prediction (a preservation anchor); erase and enhance mirror around neutral
    assert torch.equal(slider_target(neutral, positive, negative, 0.0, -1.0), neutral)
    assert torch.allclose(enhance - neutral, -(erase - neutral))


def test_erase_and_enhance_signs_and_directions():
    erase = SliderPrompt("van gogh", "van gogh")
    enhance = SliderPrompt("person", "person, old", "person, young", "person", action="enhance", multiplier=2.0,
                           bidirectional=True)
    assert erase.action == "erase" and erase.sign == -1.0 and erase.directions() == [(1.0, -1.0)]
    assert enhance.sign == 1.0 and enhance.directions() == [(2.0, 1.0), (-2.0, -1.0)]


def test_leco_training_method_picks_modules():
    from loralab.recipes.slider import trains_module

    names = {"k": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
             "q": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q",
             "self": "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v",
             "ff": "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"}
    picked = {m: {k for k, n in names.items() if trains_module(n, m)} for m in
              ("full", "xattn", "xattn_kv", "selfattn", "noxattn", "innoxattn")}
    assert picked == {"full": set(names), "xattn": {"k", "q"}, "xattn_kv": {"k"}, "selfattn": {"self"},
                      "noxattn": {"self", "ff"}, "innoxattn": {"self", "ff"}}


# ------------------------------------------------------------------------------------------ the prompt file
def test_prompt_file_leco_defaults_toml_and_yaml(tmp_path):
    toml = write(tmp_path / "p.toml", '[[prompts]]\ntarget = "van gogh"\n\n[[prompts]]\ntarget = "person"\n'
                 'positive = "person, old"\nunconditional = "person, young"\naction = "enhance"\n'
                 'guidance_scale = 4\nresolution = [48, 32]\nbatch_size = 2\n')
    a, b = read_prompts(toml)
    assert (a.target, a.positive, a.negative, a.neutral, a.action, a.guidance_scale) == \
        ("van gogh", "van gogh", "", "", "erase", 1.0)  # LECO: positive = target, neutral = unconditional = ""
    assert (b.negative, b.neutral, b.guidance_scale, b.resolution, b.batch_size) == \
        ("person, young", "person, young", 4.0, (48, 32), 2)
    yaml = write(tmp_path / "p.yaml", "- target: van gogh\n  action: enhance\n  negative: ''\n  neutral: art\n")
    (c,) = read_prompts(yaml)
    assert (c.target, c.positive, c.neutral, c.sign) == ("van gogh", "van gogh", "art", 1.0)


@pytest.mark.parametrize("text, message", [
    ("", "holds no prompts"),
    ("[[prompts]]\npositive = \"x\"\n", "prompt 1: target missing"),
    ("[[prompts]]\ntarget = \"x\"\naction = \"remove\"\n", "action 'remove' is not accepted"),
    ("[[prompts]]\ntarget = \"x\"\nguidence_scale = 2\n", "unknown key 'guidence_scale'"),
    ("[[prompts]]\ntarget = \"x\"\nresolution = 30\n", "resolution must be"),
    ("[[prompts]]\ntarget = \"x\"\nnegative = \"a\"\nunconditional = \"b\"\n", "give one"),
    ("target = \"x\"\n", "unknown top-level key 'target'"),
])
def test_prompt_file_problems(tmp_path, text, message):
    with pytest.raises(LoralabError, match=message):
        read_prompts(write(tmp_path / "p.toml", text))


# ------------------------------------------------------------------------------------------ a real slider run
@pytest.fixture(scope="session")
def size_slider(tmp_path_factory):
    """A short size slider trained on the lab model through `loralab train`'s path (`recipe_for`), with a
    sample image at its last step."""
    from loralab.recipes import train_any

    root = tmp_path_factory.mktemp("slider")
    samples = write(root / "samples.txt", "red circle, blue background --w 32 --h 32 --d 1 --s 4 --l 3\n")
    cfg = build_config(None, {
        "pretrained_model_name_or_path": str(lab_model_path()), "prompts_file": str(size_slider_toml(root / "p.toml")),
        "output_dir": str(root / "out"), "output_name": "size", "resolution": "32", "network_dim": 8,
        "network_alpha": 8, "learning_rate": 2e-3, "max_train_steps": 36, "max_denoising_steps": 8,
        "sample_prompts": str(samples), "sample_every_n_steps": 36, "save_precision": "fp16", "seed": 0})
    assert isinstance(recipe_for(cfg), SliderRecipe)
    torch.set_num_threads(1)
    return train_any(cfg), root


def test_slider_run_writes_a_standard_lora_file(size_slider):
    from loralab.lab.model import LabModel
    from loralab.network.lora import LoRANetwork

    result, root = size_slider
    assert result.global_step == 36 and result.final_file == root / "out" / "size.safetensors"
    with safe_open(str(result.final_file), framework="pt") as f:
        keys, md = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)  # kohya names; UNet only (text encoders frozen)
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"alpha"} | {"weight"}
    assert md["loralab_recipe"] == "slider" and md["ss_network_dim"] == "8"
    assert json.loads(md["loralab_slider_prompts"])[0]["positive"] == "red circle, blue background, large"
    assert json.loads(md["loralab_slider_settings"]) == {"max_denoising_steps": 8, "leco_denoise_guidance_scale": 3.0}
    assert len(result.sample_files) == 1 and Image.open(result.sample_files[0]).format == "PNG"  # sampling works
    model = LabModel.load("cpu")
    net = LoRANetwork.from_weights(str(result.final_file), model.unet, [model.te], "sd1", multiplier=-1.0)
    assert not net.text_encoder_loras and len(net.unet_loras) > 0


def test_slider_at_minus_one_and_plus_one_through_generate(size_slider, tmp_path):
    """`loralab generate --lora FILE:-1` and `:1` load the file; the evaluator reads bigger shapes at +1."""
    from loralab.cli import main
    from loralab.lab.evaluator import Evaluator
    from loralab.lab.model import evaluator_path

    result, root = size_slider
    prompts = write(tmp_path / "held.txt", "".join(f"{c} {s}, {b} background --w 32 --h 32 --d {i} --s 20 --l 7.5\n"
                                                   for i, (c, s, b) in enumerate(HELD)))
    ev = Evaluator.load(evaluator_path())
    extents = {}
    for weight in ("-1", "1"):
        out = tmp_path / f"w{weight}"
        assert main(["generate", "--model", str(lab_model_path()), "--prompts", str(prompts), "--out", str(out),
                     "--lora", f"{result.final_file}:{weight}", "--device", "cpu"]) == 0
        files = sorted(out.glob("*.png"))
        assert len(files) == len(HELD)
        preds = ev.predict([Image.open(p).convert("RGB") for p in files])
        extents[weight] = [p["extent"] for p in preds]
    smaller = sum(a < b for a, b in zip(extents["-1"], extents["1"]))
    assert smaller >= len(HELD) - 1, extents  # each held prompt drawn smaller at −1 than at +1 (one tie allowed)
    assert sum(extents["1"]) / len(HELD) > sum(extents["-1"]) / len(HELD) + 0.1, extents


# ------------------------------------------------------------------------------------------ bad input, CLI
def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loralab.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_slider_config_without_prompts_is_one_clear_message(tmp_path):
    empty = write(tmp_path / "prompts.toml", "# no entries yet\n")
    config = write(tmp_path / "slider.toml", f'pretrained_model_name_or_path = "{lab_model_path()}"\n'
                   f'prompts_file = "{empty}"\noutput_dir = "{tmp_path / "out"}"\nmax_denoising_steps = 20\n')
    r = run_cli("train", "--config", str(config), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = next(x for x in r.stderr.splitlines() if "holds no prompts" in x)  # one line, no traceback
    assert line.startswith(f"error: prompts_file: {empty} holds no prompts") and "[[prompts]]" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # refused before anything ran
    # slider keys but no prompts_file (and no images): the message says what is missing
    no_file = write(tmp_path / "slider2.toml", f'pretrained_model_name_or_path = "{lab_model_path()}"\n'
                    'max_denoising_steps = 20\nleco_denoise_guidance_scale = 2.0\n')
    with pytest.raises(LoralabError, match="slider / LECO run.*give prompts_file"):
        build_config(no_file)
    with pytest.raises(LoralabError, match="prompts_file: .*missing.toml does not exist"):
        build_config(None, {"pretrained_model_name_or_path": str(lab_model_path()),
                            "prompts_file": str(tmp_path / "missing.toml")})


def test_xattn_kv_trains_only_the_cross_attention_key_value_modules(tmp_path):
    cfg = build_config(None, {"pretrained_model_name_or_path": str(lab_model_path()),
                              "prompts_file": str(size_slider_toml(tmp_path / "p.toml")), "output_dir": str(tmp_path),
                              "resolution": "32", "leco_training_method": "xattn_kv", "max_train_steps": 1})
    recipe = SliderRecipe()
    run = recipe.prepare(cfg)
    try:
        trained = {m.lora_name for m in run.network.unet_loras if any(p.requires_grad for p in m.parameters())}
        assert trained and all(n.endswith(("attn2_to_k", "attn2_to_v")) for n in trained)
        assert {id(p) for p in run.params} == {id(p) for m in run.network.unet_loras if m.lora_name in trained
                                               for p in m.parameters()}
        assert not run.network.text_encoder_loras and run.dataset is None and len(recipe.batches(run, 0)) == 6
    finally:
        run.network.restore()
        run.log.close()


def test_dry_run_of_a_slider_config_lists_its_prompts_not_a_dataset(tmp_path, capsys):
    from loralab.cli import main

    prompts = size_slider_toml(tmp_path / "p.toml")
    config = write(tmp_path / "slider.toml", f'pretrained_model_name_or_path = "{lab_model_path()}"\n'
                   f'prompts_file = "{prompts}"\noutput_dir = "{tmp_path / "out"}"\nmax_train_epochs = 3\n')
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    n = len(SIZE_PAIRS)
    assert f"{prompts}: {n} prompt entries (slider / LECO: no images; train_data_dir is not read)" in out
    assert "enhance target" in out and f"{n} batches per epoch" in out and f"3 epochs, {3 * n} steps" in out
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ method = "uce"
def test_uce_delta_is_the_least_squares_edit():
    from loralab.recipes.slider import uce_delta

    g = torch.Generator().manual_seed(0)
    w, src, tgt, keep = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 4), (3, 4), (3, 4), (6, 4)))
    lam, ridge = 0.7, 0.01
    delta = uce_delta(w, src, tgt, keep, lam, ridge).requires_grad_(True)
    loss = (((w + delta) @ src.T - w @ tgt.T) ** 2).sum() + lam * ((delta @ keep.T) ** 2).sum() + ridge * (delta ** 2).sum()
    loss.backward()
    assert delta.grad.abs().max() < 1e-9  # the minimiser of the docstring's objective
    exact = uce_delta(w, src, tgt, torch.zeros(0, 4, dtype=torch.float64), 1.0, 1e-12)
    assert torch.allclose((w + exact) @ src.T, w @ tgt.T, atol=1e-6)  # nothing kept: the edit is exact


def test_uce_maps_each_concept_position_to_the_neutral_one():
    from loralab.models.tokenizer import clip_tokenizer
    from loralab.recipes.slider import concept_positions

    tok = clip_tokenizer()
    a, b = tok("red heart, green background").input_ids, tok("heart, green background").input_ids
    # BOS red heart , green background EOS pad...: red -> BOS, the words after it one place back
    assert concept_positions(a, b, 9) == [0, 0, 1, 2, 3, 4, 5, 6, 7]
    a2 = tok("big dark red heart").input_ids  # two words inside, after one kept
    assert concept_positions(a2, tok("big heart").input_ids, 7) == [0, 1, 0, 0, 2, 3, 4]
    with pytest.raises(LoralabError, match="without the concept's words"):
        concept_positions(tok("red heart").input_ids, tok("blue heart").input_ids, 5)


@pytest.mark.parametrize("text, message", [
    ('method = "closed"\n[[prompts]]\ntarget = "red heart"\nneutral = "heart"\n', "method 'closed' is not accepted"),
    ('method = "uce"\n[[prompts]]\ntarget = "x"\naction = "enhance"\n', "erase entries and anchors"),
    ('method = "uce"\n[[prompts]]\ntarget = "x"\naction = "enhance"\nguidance_scale = 0\n', "at least one erase"),
    ('method = "uce"\n[[prompts]]\ntarget = "red heart"\nneutral = "blue heart"\n', "neutral must be the target"),
    ('method = "uce"\npreserve_weight = 0\n[[prompts]]\ntarget = "red heart"\nneutral = "heart"\n', "above 0"),
])
def test_uce_prompt_file_problems_before_loading(tmp_path, text, message):
    model = write(tmp_path / "not-a-model.safetensors", "")  # never loaded: the file is checked first
    with pytest.raises(LoralabError, match=message):
        SliderRecipe().prepare(build_config(None, {"pretrained_model_name_or_path": str(model),
                                                   "prompts_file": str(write(tmp_path / "p.toml", text)),
                                                   "output_dir": str(tmp_path)}))


def test_uce_erase_on_the_lab_model_erases_red_and_keeps_the_anchors(tmp_path):
    """`method = "uce"` through `loralab train`'s path: no training step, a standard LoRA whose only non-zero
    modules are the cross-attention k/v; at weight 1 red prompts it never saw are no longer drawn red (lab
    evaluator), other colours' prompts are."""
    from safetensors.torch import load_file

    from loralab.lab import world as W
    from loralab.lab.evaluator import Evaluator
    from loralab.lab.model import LabModel, evaluator_path
    from loralab.network.lora import LoRANetwork
    from loralab.recipes import train_any

    pairs = [(s, b) for s in W.TRAIN_SHAPES for b in W.BACKGROUNDS]
    erase, scored = pairs[::3], [p for i, p in enumerate(pairs) if i % 3 == 1][:8]
    keep = [t for t in W.training_triples() if t[1] != "red"]
    text = 'method = "uce"\npreserve_weight = 1.0\n' + "".join(
        f'[[prompts]]\ntarget = "red {s}, {b} background"\nneutral = "{s}, {b} background"\nguidance_scale = 2.0\n'
        for s, b in erase) + "".join(
        f'[[prompts]]\ntarget = "{c} {s}, {b} background"\nneutral = "{c} {s}, {b} background"\naction = "enhance"\n'
        f'guidance_scale = 0\n' for s, c, b in keep)
    cfg = build_config(None, {"pretrained_model_name_or_path": str(lab_model_path()), "output_dir": str(tmp_path),
                              "prompts_file": str(write(tmp_path / "p.toml", text)), "output_name": "uce",
                              "resolution": "32", "network_dim": 8, "network_alpha": 4, "max_train_steps": 100,
                              "save_precision": "float", "seed": 0})
    result = train_any(cfg)
    assert result.global_step == 0 and result.final_file == tmp_path / "uce.safetensors"
    sd = load_file(str(result.final_file))
    nonzero = {k.split(".")[0] for k, v in sd.items() if k.endswith("lora_up.weight") and v.abs().max() > 0}
    assert nonzero and all(k.endswith(("_attn2_to_k", "_attn2_to_v")) for k in nonzero)
    with safe_open(str(result.final_file), "pt") as f:
        assert json.loads(f.metadata()["loralab_slider_method"]) == {"method": "uce", "preserve_weight": 1.0}

    model = LabModel.load("cpu")
    ev = Evaluator.load(evaluator_path(), device="cpu")
    others = [t for t in W.HELD_OUT_TRIPLES if t[1] != "red"][:8]
    items = [W.WorldItem(s, "red", b, "small", 32, 32, seed=j) for j, (s, b) in enumerate(scored)] + \
        [W.WorldItem(*t, "small", 32, 32, seed=j) for j, t in enumerate(others)]
    prompts = [f"{it.colour} {it.shape}, {it.background} background" for it in items]

    def colours(lora):
        net = None
        if lora:
            net = LoRANetwork.from_weights(str(lora), model.unet, [model.te], "sd1", multiplier=1.0)
            net.to(model.device, dtype=torch.float32).eval()
            net.apply_to()
        try:
            return [p["colour"] for p in ev.predict(model.generate(items, prompts, steps=20, cfg=7.5, seed=0))]
        finally:
            if net is not None:
                net.restore()

    base, erased = colours(None), colours(result.final_file)
    assert sum(c == "red" for c in base[:8]) >= 7
    assert sum(c == "red" for c in erased[:8]) <= 2, erased[:8]
    assert sum(c == t[1] for c, t in zip(erased[8:], others)) >= 7, list(zip(erased[8:], others))


def test_uce_on_sdxl_writes_kohyas_sdxl_module_names(tmp_path):
    """The closed form is computed on diffusers' module paths; SDXL's kohya names differ (input_blocks_...), so
    the edit is copied by the wrapped layer, not by name: the file holds non-zero k/v modules under kohya's
    SDXL names."""
    from safetensors.torch import load_file

    from conftest import write_tiny_checkpoint
    from loralab.recipes import train_any

    ckpt = write_tiny_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    text = ('method = "uce"\n[[prompts]]\ntarget = "red heart, green background"\nneutral = "heart, green background"\n'
            'guidance_scale = 1.0\n[[prompts]]\ntarget = "blue heart, green background"\n'
            'neutral = "blue heart, green background"\naction = "enhance"\nguidance_scale = 0\n')
    cfg = build_config(None, {"pretrained_model_name_or_path": str(ckpt), "output_dir": str(tmp_path / "out"),
                              "prompts_file": str(write(tmp_path / "p.toml", text)), "output_name": "uce",
                              "resolution": "64", "network_dim": 4, "save_precision": "float"})
    sd = load_file(str(train_any(cfg).final_file))
    nonzero = sorted(k.split(".")[0] for k, v in sd.items() if k.endswith("lora_up.weight") and v.abs().max() > 0)
    assert nonzero and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                         "lora_unet_output_blocks_")) for k in nonzero), nonzero
    assert all(k.endswith(("_attn2_to_k", "_attn2_to_v")) for k in nonzero)
