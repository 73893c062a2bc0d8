"""Pivotal tuning (`recipes/pivotal.py`): new tokens trained as embeddings with the LoRA, saved bundled in the
LoRA file (A1111's `bundle_emb.*` layout) and as separate embedding files, loaded back by `loralab generate`.

One short pivotal run on the lab model (module-scoped) serves the layout, training, stop and image tests; a
two-step run on a tiny SDXL model checks both encoders' keys."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loralab.cli import main
from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.lab import world as W
from loralab.lab.model import lab_model_path
from loralab.models.embeddings import add_new_token, clear_new_tokens, extended_embedding, init_vectors, new_tokens
from loralab.models.loader import save_single_file
from loralab.models.text import tokenize, tokenize_weighted
from loralab.models.tiny import tiny_sd_components
from loralab.models.tokenizer import clip_tokenizer
from loralab.network.files import split_bundle
from loralab.recipes import recipe_for
from loralab.recipes.pivotal import PivotalRecipe, warn_split
from loralab.review.generate import SamplingModel
from loralab.train.callbacks import Callback
from loralab.train.loop import fit
from loralab.train.sampling import SamplePrompt

TOKEN = "vexdef"
PROMPT = SamplePrompt(f"{TOKEN}, red, green background, small", width=64, height=64, seed=3, steps=4, scale=7.5)


def lab_keys(data: Path, out: Path, **kw) -> dict:
    keys = {"pretrained_model_name_or_path": str(lab_model_path()), "train_data_dir": str(data),
            "output_dir": str(out), "output_name": "piv", "resolution": "32", "network_dim": 4, "network_alpha": 4,
            "learning_rate": 1e-3, "network_train_unet_only": True, "train_batch_size": 2, "seed": 0,
            "save_precision": "float", "device": "cpu", "cache_latents": True, "token_string": TOKEN,
            "init_word": "circle", "num_vectors_per_token": 2, "embedding_lr": 2e-2}
    keys.update(kw)
    return keys


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    """10 steps of pivotal tuning on the lab model (UNet-only LoRA, 2 vectors from "circle", embeddings frozen
    after 5 steps, a save at step 5, a sample image at the end); the run kept for the in-memory model."""
    root = tmp_path_factory.mktemp("pivotal")
    W.write_kohya_dataset(root / "data", tag=TOKEN, n=4, repeats=1, sizes=[(32, 32)])
    prompts = root / "prompts.txt"
    prompts.write_text(f"{TOKEN}, blue, red background --w 32 --h 32 --d 1 --s 2 --l 4\n")
    cfg = build_config(None, lab_keys(root / "data", root / "out", max_train_steps=10, save_every_n_steps=5,
                                      stop_embedding_training=5, sample_prompts=str(prompts),
                                      sample_every_n_steps=10))
    recipe = recipe_for(cfg)
    assert isinstance(recipe, PivotalRecipe)
    state = {}

    class Keep(Callback):
        def on_train_start(self, run):
            state["run"] = run
            state["start"] = {k: [p.detach().clone() for p in ps] for k, ps in recipe.tokens.params.items()}

    result = fit(recipe.prepare(cfg), recipe, [Keep()])
    yield {"result": result, "run": state["run"], "start": state["start"], "recipe": recipe, "root": root}
    clear_new_tokens(state["run"].model.tokenizers, state["run"].model.text_encoders)


def test_sd1_files_have_the_bundle_and_embedding_layouts(lab_run):
    final, out = lab_run["result"].final_file, lab_run["root"] / "out"
    sd = load_file(str(final))
    bundle = {k: v for k, v in sd.items() if k.startswith("bundle_emb.")}
    assert list(bundle) == [f"bundle_emb.{TOKEN}.string_to_param.*"]  # A1111 PR #13568, SD 1.x/2.x
    assert bundle[f"bundle_emb.{TOKEN}.string_to_param.*"].shape == (2, 64)  # 2 vectors, the lab CLIP's width
    assert all(k.startswith("lora_unet_") for k in sd if k not in bundle)
    emb_file = out / "piv_emb" / f"{TOKEN}.safetensors"
    emb = load_file(str(emb_file))
    assert list(emb) == ["emb_params"]  # kohya TI's layout, which A1111 and ComfyUI load by the file name
    assert torch.equal(emb["emb_params"], bundle[f"bundle_emb.{TOKEN}.string_to_param.*"])
    with safe_open(str(final), "pt") as f:
        info = json.loads(f.metadata()["loralab_pivotal"])
    assert info["tokens"] == [TOKEN] and info["init_words"] == ["circle"] and info["num_vectors_per_token"] == 2
    assert info["embedding_steps"] == 5 and info["stop_embedding_training"] == 5
    assert (out / "piv-step00000005_emb" / f"{TOKEN}.safetensors").is_file()
    assert len(list((out / "sample").glob("piv_*.png"))) == 1  # the sample prompt with the new token drew


def test_embeddings_train_from_the_init_word_and_stop_after_n_steps(lab_run):
    run, start = lab_run["run"], lab_run["start"][TOKEN][0]
    tok, te = run.model.tokenizers[0], run.model.text_encoders[0]
    circle = tok("circle", add_special_tokens=False).input_ids
    table = extended_embedding(te).base.weight.detach().clone()
    assert torch.equal(start, table[[circle[0], circle[0]]].float())  # kohya: the init word, cycled
    at_5 = load_file(str(lab_run["root"] / "out" / "piv-step00000005.safetensors"))
    final = load_file(str(lab_run["result"].final_file))
    key = f"bundle_emb.{TOKEN}.string_to_param.*"
    assert (at_5[key] - start).abs().max() > 1e-3  # trained for 5 steps
    assert torch.equal(at_5[key], final[key])  # then frozen while the LoRA trained on
    up = [k for k in final if k.endswith("lora_up.weight")]
    assert any(not torch.equal(at_5[k], final[k]) for k in up)
    assert torch.equal(extended_embedding(te).base.weight, table)  # the vocabulary is untouched
    assert new_tokens(tok)[TOKEN] == [49408, 49409]


def test_a_pivotal_lora_continues_with_its_trained_vectors(lab_run, tmp_path):
    final = lab_run["result"].final_file
    cfg = build_config(None, lab_keys(lab_run["root"] / "data", tmp_path / "out", max_train_steps=1,
                                      network_weights=str(final), embedding_lr=0.0))
    recipe = recipe_for(cfg)
    run = recipe.prepare(cfg)
    try:
        trained = load_file(str(final))[f"bundle_emb.{TOKEN}.string_to_param.*"]
        assert torch.equal(recipe.tokens.params[TOKEN][0].detach(), trained)
        with pytest.raises(LoralabError, match="has 2 vectors, num_vectors_per_token is 1"):
            PivotalRecipe().prepare(build_config(None, lab_keys(lab_run["root"] / "data", tmp_path / "o2",
                                                                network_weights=str(final), num_vectors_per_token=1)))
    finally:
        clear_new_tokens(run.model.tokenizers, run.model.text_encoders)


def draw(sm: SamplingModel) -> np.ndarray:
    return np.asarray(sm.draw([PROMPT])[0])


class Interrupt(Exception):
    pass


def test_a_resumed_pivotal_run_ends_with_the_straight_runs_files_and_overwrite_clears_emb_folders(tmp_path):
    """6 steps, embeddings frozen after 4, a state every 3 steps: a run that dies after step 3 (mid-epoch)
    and resumes from its state ends with the straight run's LoRA file and embedding file, bit for bit. Then
    `overwrite` removes the earlier run's `_emb` folders with its LoRA files."""
    W.write_kohya_dataset(tmp_path / "data", tag=TOKEN, n=4, repeats=1, sizes=[(32, 32)])
    runs = []

    class Keep(Callback):
        def on_train_start(self, run):
            runs.append(run)

    class CrashAfterStep3(Callback):  # after the step's saves (the recipe's callbacks run first)
        def on_step_end(self, run):
            if run.global_step == 3:
                raise Interrupt

    def go(out, extra=(), **kw):
        keys = dict(max_train_steps=6, save_every_n_steps=3, save_state=True, stop_embedding_training=4,
                    optimizer_type="AdamW", lr_scheduler="cosine")
        cfg = build_config(None, lab_keys(tmp_path / "data", out, **{**keys, **kw}))
        recipe = recipe_for(cfg)
        try:
            return fit(recipe.prepare(cfg), recipe, [Keep(), *extra])
        finally:
            if runs:
                clear_new_tokens(runs[-1].model.tokenizers, runs[-1].model.text_encoders)

    straight = go(tmp_path / "a")
    with pytest.raises(Interrupt):
        go(tmp_path / "b", [CrashAfterStep3()])
    state = tmp_path / "b" / "piv-step00000003-state"
    saved = load_file(str(state / "embeddings.safetensors"))
    at_3 = load_file(str(tmp_path / "b" / "piv-step00000003.safetensors"))
    assert list(saved) == [f"{TOKEN}.0"] and saved[f"{TOKEN}.0"].dtype == torch.float32
    assert torch.equal(saved[f"{TOKEN}.0"], at_3[f"bundle_emb.{TOKEN}.string_to_param.*"])  # save_precision float
    resumed = go(tmp_path / "b", resume=str(state))
    assert resumed.global_step == straight.global_step == 6
    for a, b in ((straight.final_file, resumed.final_file),
                 *((tmp_path / x / "piv_emb" / f"{TOKEN}.safetensors" for x in "ab"),)):
        sa, sb = load_file(str(a)), load_file(str(b))
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (a.name, k)
    with safe_open(str(resumed.final_file), "pt") as f:
        assert json.loads(f.metadata()["loralab_pivotal"])["embedding_steps"] == 4
    assert (tmp_path / "b" / "piv-state" / "embeddings.safetensors").is_file()  # the final state has them too

    # a state without the vectors (saved before pivotal runs kept them) is refused before anything loads
    old = tmp_path / "old-state"
    shutil.copytree(state, old)
    (old / "embeddings.safetensors").unlink()
    with pytest.raises(LoralabError, match="has no embeddings.safetensors"):
        PivotalRecipe().prepare(build_config(None, lab_keys(tmp_path / "data", tmp_path / "b", resume=str(old))))

    # overwrite: the earlier run's _emb folders go with its LoRA files (a token it had and this run has not)
    (tmp_path / "a" / "piv_emb" / "oldtok.safetensors").write_bytes(b"")
    go(tmp_path / "a", max_train_steps=1, save_every_n_steps=0, save_state=False, overwrite=True)
    left = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("piv"))
    assert left == ["piv.safetensors", "piv_emb"], left
    assert [p.name for p in (tmp_path / "a" / "piv_emb").iterdir()] == [f"{TOKEN}.safetensors"]

    # save_last_n_steps = 1 (kohya counts steps: after step 3's save, step 1's goes) takes the _emb folder too
    go(tmp_path / "c", max_train_steps=4, save_every_n_steps=1, save_last_n_steps=1, save_state=False)
    left = sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.startswith("piv"))
    assert left == ["piv-step00000002.safetensors", "piv-step00000002_emb", "piv-step00000003.safetensors",
                    "piv-step00000003_emb", "piv.safetensors", "piv_emb"], left


def test_bundle_separate_file_and_in_memory_model_draw_the_same_image(lab_run, tmp_path):
    run = lab_run["run"]
    run.network.eval()
    run.network.apply_to()  # `fit` takes the network off the model at its end; the new tokens stay
    try:
        memory = draw(SamplingModel(run.model, str(lab_model_path()), torch.device("cpu"), torch.float32))
    finally:
        run.network.restore()
    sm = SamplingModel.load(lab_model_path(), device="cpu")
    final = lab_run["result"].final_file
    base = draw(sm)
    sm.apply(final)
    bundled = draw(sm)
    sm.remove()
    assert new_tokens(sm.model.tokenizers[0]) == {}
    lora_only = tmp_path / "lora_only.safetensors"
    save_file(split_bundle(load_file(str(final)))[0], str(lora_only))
    sm.apply(lora_only)
    without_embedding = draw(sm)
    sm.apply_embedding(lab_run["root"] / "out" / "piv_emb" / f"{TOKEN}.safetensors")
    separate = draw(sm)
    sm.remove()
    assert np.array_equal(bundled, memory) and np.array_equal(separate, memory)
    assert not np.array_equal(without_embedding, memory) and not np.array_equal(base, memory)


def test_loralab_generate_loads_bundled_and_separate_embeddings(lab_run, tmp_path, one_thread):
    # one torch thread here as in the subprocess (OMP_NUM_THREADS=1): the pixels depend on the thread count
    final = lab_run["result"].final_file
    lora_only = tmp_path / "lora_only.safetensors"
    save_file(split_bundle(load_file(str(final)))[0], str(lora_only))
    line = f"{PROMPT.prompt} --w 64 --h 64 --d 3 --s 4 --l 7.5"
    emb = lab_run["root"] / "out" / "piv_emb" / f"{TOKEN}.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "generate", "--model", str(lab_model_path()), "--lora",
                        str(lora_only), "--embedding", str(emb), "--out", str(tmp_path / "sep"), "--device", "cpu",
                        line], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    sm = SamplingModel.load(lab_model_path(), device="cpu")
    sm.apply(final)
    bundled = draw(sm)
    sm.remove()
    separate = np.asarray(Image.open(next((tmp_path / "sep").glob("*.png"))).convert("RGB"))
    assert np.array_equal(separate, bundled)


def test_generate_refuses_a_missing_embedding_file_in_one_line(tmp_path, capsys):
    rc = main(["generate", "--model", str(lab_model_path()), "--embedding", str(tmp_path / "vexdef.safetensors"),
               "vexdef --d 1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: --embedding {tmp_path / 'vexdef.safetensors'}: not a file" in err


@pytest.fixture(scope="module")
def tiny_sdxl_checkpoint(tmp_path_factory) -> Path:
    c = tiny_sd_components("sdxl", seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors"
    save_single_file(path, c["unet"], c["vae"], [c["text_encoder"], c["text_encoder_2"]], family="sdxl",
                     dtype=torch.float32)
    return path


def test_sdxl_trains_both_encoders_embeddings_as_clip_l_and_clip_g(tiny_sdxl_checkpoint, tmp_path):
    W.write_kohya_dataset(tmp_path / "data", tag=TOKEN, n=2, repeats=1, sizes=[(64, 64)])
    cfg = build_config(None, {**lab_keys(tmp_path / "data", tmp_path / "out", max_train_steps=2, resolution="64",
                                         num_vectors_per_token=1, init_word="red", embedding_lr=5e-2),
                              "pretrained_model_name_or_path": str(tiny_sdxl_checkpoint)})
    recipe = recipe_for(cfg)
    run = recipe.prepare(cfg)
    starts = [p.detach().clone() for p in recipe.tokens.params[TOKEN]]
    result = fit(run, recipe)
    sd = load_file(str(result.final_file))
    widths = [te.config.hidden_size for te in run.model.text_encoders]
    bundle = {k: v for k, v in sd.items() if k.startswith("bundle_emb.")}
    assert sorted(bundle) == [f"bundle_emb.{TOKEN}.clip_g", f"bundle_emb.{TOKEN}.clip_l"]
    assert bundle[f"bundle_emb.{TOKEN}.clip_l"].shape == (1, widths[0])
    assert bundle[f"bundle_emb.{TOKEN}.clip_g"].shape == (1, widths[1])
    for key, start in zip(("clip_l", "clip_g"), starts):
        assert (bundle[f"bundle_emb.{TOKEN}.{key}"] - start).abs().max() > 1e-4  # each encoder's vectors trained
    emb = load_file(str(tmp_path / "out" / "piv_emb" / f"{TOKEN}.safetensors"))
    assert sorted(emb) == ["clip_g", "clip_l"]
    clear_new_tokens(run.model.tokenizers, run.model.text_encoders)
    sm = SamplingModel.load(tiny_sdxl_checkpoint, device="cpu")
    sm.apply(result.final_file)
    ids = [tokenize(t, [f"{TOKEN}, red"])[0, :3].tolist() for t in sm.model.tokenizers]
    assert ids[0] == ids[1] == [49406, 49408, 267]
    sm.remove()


def test_a_split_token_warns_with_its_pieces(caplog):
    tok = clip_tokenizer()
    with caplog.at_level(logging.WARNING):
        assert warn_split(tok, "vexdef") == ["vex", "def</w>"]
        assert warn_split(tok, "olis") == ["olis</w>"]
    assert "vex + def</w>" in caplog.text and "already a token of the vocabulary (olis</w>)" in caplog.text


def test_an_init_word_longer_than_the_vectors_is_a_clear_error(tmp_path, capsys):
    tok = clip_tokenizer()
    table = torch.randn(49408, 8)
    with pytest.raises(LoralabError, match=r"init_word 'red circle' for 'vexdef' is 2 tokens \(red</w> \+ circle</w>\) "
                                           r"but num_vectors_per_token = 1"):
        init_vectors(tok, table, "red circle", 1, token="vexdef")
    assert init_vectors(tok, table, "red circle", 3, token="vexdef").shape == (3, 8)
    W.write_kohya_dataset(tmp_path / "data", tag=TOKEN, n=1, repeats=1, sizes=[(32, 32)])
    toml = tmp_path / "run.toml"
    toml.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in lab_keys(
        tmp_path / "data", tmp_path / "out", max_train_steps=1, init_word="big red circle",
        num_vectors_per_token=2).items()) + "\n")
    assert main(["train", "--config", str(toml)]) == 2  # `loralab train`: one line, no traceback, nothing loaded
    err = capsys.readouterr().err
    assert "error: init_word 'big red circle' for 'vexdef' is 3 tokens (big</w> + red</w> + circle</w>)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_bad_pivotal_keys_are_refused_before_loading(tmp_path):
    W.write_kohya_dataset(tmp_path / "data", tag=TOKEN, n=1, repeats=1, sizes=[(32, 32)])
    keys = lab_keys(tmp_path / "data", tmp_path / "out", max_train_steps=1)
    with pytest.raises(LoralabError, match="cache_text_encoder_outputs: pivotal tuning"):
        build_config(None, {**keys, "cache_text_encoder_outputs": True})
    for bad, match in (({"token_string": "vex def"}, "is not one word"),
                       ({"token_string": "a, b", "init_word": "x, y, z"}, "3 init words for 2 tokens"),
                       ({"num_vectors_per_token": 0}, "num_vectors_per_token"),
                       ({"resume": str(tmp_path)}, "resume")):
        with pytest.raises(LoralabError, match=match):
            recipe_for(build_config(None, {**keys, **bad})).prepare(build_config(None, {**keys, **bad}))


def embedding_only_encoder() -> torch.nn.Module:
    """A text encoder reduced to what new tokens touch: its token embedding (CLIP's vocabulary, width 8)."""
    te = torch.nn.Module()
    te.text_model = torch.nn.Module()
    te.text_model.embeddings = torch.nn.Module()
    te.text_model.embeddings.token_embedding = torch.nn.Embedding(49408, 8)
    return te


def test_new_tokens_leave_other_captions_alone():
    tok = clip_tokenizer()
    te = embedding_only_encoder()
    texts = ["a vexdef ring", "vexdefs, red", "(vexdef:1.2), Vexdef"]
    before = tokenize(tok, texts)
    add_new_token([tok], [te], TOKEN, [torch.ones(2, 8)])
    after = tokenize(tok, texts)
    assert after[0, :6].tolist() == [49406, 320, 49408, 49409, 2540, 49407]
    assert torch.equal(after[1], before[1])  # "vexdefs" is another word
    assert after[2].tolist().count(49408) == 2  # any case, next to punctuation
    ids, weights = tokenize_weighted(tok, ["(vexdef:1.5), red"], max_token_length=150)  # weighted, 2 chunks
    assert ids.shape == (1, 154) and ids[0, 1:5].tolist() == [49408, 49409, 267, 736]
    assert weights[0, 1:5].tolist() == [1.5, 1.5, 1.0, 1.0]
    out = te.text_model.embeddings.token_embedding(after[:1, :5])
    assert torch.equal(out[0, 2], torch.ones(8)) and torch.equal(out[0, 1], te.text_model.embeddings.token_embedding.base.weight[320])
    clear_new_tokens([tok], [te])
    assert torch.equal(tokenize(tok, texts), before)
    assert isinstance(te.text_model.embeddings.token_embedding, torch.nn.Embedding)


# ------------------------------------------------------------------- judging commands (attention, bleed)
def one_vector_embedding(lab_run, tmp_path: Path, token: str = "vexone") -> Path:
    """A 1-vector embedding file `<token>.safetensors`: the first trained vector of the run's vexdef."""
    sd = load_file(str(lab_run["root"] / "out" / "piv_emb" / f"{TOKEN}.safetensors"))
    path = tmp_path / f"{token}.safetensors"
    save_file({k: v[:1].contiguous() for k, v in sd.items()}, str(path))
    return path


def test_attention_maps_a_pivotal_token_at_its_own_positions(lab_run, tmp_path, capsys):
    from loralab.analyze.attention import word_positions

    tok = clip_tokenizer()
    base = word_positions(tok, "vexdef, vexone, red", ["vexdef", "vexone", "red"])
    assert [w.tokens for w in base] == [("vex", "def</w>"), ("vex", "one</w>"), ("red</w>",)]
    assert [w.positions for w in base] == [(1, 2), (4, 5), (7,)]
    emb = one_vector_embedding(lab_run, tmp_path)
    out = tmp_path / "maps"
    rc = main(["attention", "--model", str(lab_model_path()), "--lora", str(lab_run["result"].final_file),
               "--embedding", str(emb), "--words", "vexdef,vexone,red", "--out", str(out), "--device", "cpu",
               "vexdef, vexone, red --w 32 --h 32 --d 1 --s 2 --l 7.5"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((out / "attention.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["base model", "vexone + piv:1"]
    assert rows[0]["words"]["vexdef"]["tokens"] == ["vex", "def</w>"]
    lora = rows[1]["words"]
    assert lora["vexone"]["tokens"] == ["vexone"]  # one vector: one position
    assert lora["vexdef"]["tokens"] == ["vexdef#0", "vexdef#1"]  # num_vectors_per_token = 2
    assert all(0 < w["region_share"] < 1 for w in lora.values())  # the maps were computed
    assert (out / "lora_vexone.png").is_file()
    assert rows[1]["mass_inside"]["vexdef"]["vexone"] != rows[0]["mass_inside"]["vexdef"]["vexone"]
    assert new_tokens(tok) == {}  # the command took its tokens off


def test_bleed_finds_no_shared_pieces_for_a_pivotal_tag(lab_run, tmp_path, capsys):
    from loralab.review.bleed import bleed_probes

    plain = bleed_probes(clip_tokenizer(), ["vexdef", "vexbar"])  # without the LoRA: "vex" is shared
    assert [p.label for p in plain if p.kind == "piece"][0] == "piece 'vex' of vexdef, vexbar"
    out = tmp_path / "bleed"
    rc = main(["bleed", "--model", str(lab_model_path()), "--lora", str(lab_run["result"].final_file),
               "--tags", "vexdef,vexbar", "--seeds", "1", "--steps", "2", "--no-lab-scores", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "bleed.json").read_text())
    assert r["pivotal_tags"] == ["vexdef"] and r["new_tokens"] == ["vexdef"]
    assert r["shared_pieces"] == []
    pieces = [p for p in r["probes"] if p["kind"] == "piece"]
    assert [p["tags"] for p in pieces] == [["vexbar"], ["vexbar"]]  # only the plain tag's pieces are probed
    assert "its own trained token" in (out / "report.md").read_text()


def test_probe_bleed_and_maps_read_a_loaded_token_as_its_ids_and_split_it_without():
    from loralab.analyze.attention import word_positions
    from loralab.review.bleed import bleed_probes
    from loralab.review.probe import probe_prompts, tag_ids

    tok = clip_tokenizer()
    te = embedding_only_encoder()
    add_new_token([tok], [te], TOKEN, [torch.ones(2, 8)])
    try:
        assert tag_ids(tok, TOKEN) == [49408, 49409]
        rows = probe_prompts(tok, TOKEN, "shape", 2)
        assert all(49408 not in ids for label, ids in rows.items() if label.startswith("stand-in"))
        assert [p.kind for p in bleed_probes(tok, [TOKEN, "vexbar"])] == ["tag", "tag", "piece", "piece", "pair"]
        (w,) = word_positions(tok, "red, vexdef", [TOKEN])
        assert w.tokens == ("vexdef#0", "vexdef#1") and w.positions == (3, 4)
    finally:
        clear_new_tokens([tok], [te])
    assert tag_ids(tok, TOKEN) == tok("vexdef", add_special_tokens=False).input_ids  # vex + def</w> again
    assert any(p.kind == "piece" and len(p.tags) == 2 for p in bleed_probes(tok, [TOKEN, "vexbar"]))


def test_probe_reads_a_pivotal_token_from_the_lora_or_its_embedding_file(lab_run, tmp_path, capsys):
    final = lab_run["result"].final_file
    lora_only = tmp_path / "lora_only.safetensors"
    save_file(split_bundle(load_file(str(final)))[0], str(lora_only))
    emb = lab_run["root"] / "out" / "piv_emb" / f"{TOKEN}.safetensors"
    common = ["--model", str(lab_model_path()), "--class", "shape", "--context", "red {}, blue background, small",
              "--seeds", "1", "--stand-ins", "2", "--steps", "2", "--no-lab-scores", "--device", "cpu"]
    found = {}
    for name, extra in (("base", []), ("bundled", ["--lora", f"{final}:0.8"]),
                        ("separate", ["--lora", str(lora_only), "--embedding", str(emb)])):
        assert main(["probe", TOKEN, *common, *extra, "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
        found[name] = json.loads((tmp_path / name / "probe.json").read_text())
        assert new_tokens(clip_tokenizer()) == {}  # the command took its tokens off
    assert found["base"]["tokens"] == ["vex", "def</w>"] and found["base"]["new_tokens"] == []
    for name in ("bundled", "separate"):
        assert found[name]["tokens"] == [f"{TOKEN}#0", f"{TOKEN}#1"], found[name]  # its own two vectors
        assert found[name]["new_tokens"] == [TOKEN]
    assert found["bundled"]["loras"] == [[str(final), 0.8]] and found["separate"]["embeddings"] == [str(emb)]
    # the stand-ins are as long as the token: two pieces with the embedding, two without (vex + def</w>)
    assert len(found["bundled"]["prompts"]) == len(found["base"]["prompts"]) == 3 + 2
    assert found["bundled"]["text_distinctness"] != found["base"]["text_distinctness"]


def test_attention_and_bleed_refuse_a_missing_embedding_file_in_one_line(tmp_path, capsys):
    missing = tmp_path / "vexone.safetensors"
    for argv in (["attention", "--model", str(lab_model_path()), "--embedding", str(missing), "vexone, red"],
                 ["probe", "--model", str(lab_model_path()), "--embedding", str(missing), "vexone"],
                 ["bleed", "--model", str(lab_model_path()), "--lora", str(lab_model_path()), "--tags", "vexone",
                  "--embedding", str(missing)]):
        assert main(argv) == 2
        assert f"error: --embedding {missing}: not a file" in capsys.readouterr().err
