"""Fingerprint training behaviour: train a fixed set of configs on tiny random models and print the
SHA-256 of every file each run writes (LoRA files, state folders, samples, the step log).

Use it around a refactor of the training code: run it before and after, on the same machine, and compare.

    python tools/train_hashes.py --work /tmp/hashes_a --out before.json
    python tools/train_hashes.py --work /tmp/hashes_b --out after.json --compare before.json

Values that hold the wall clock are left out of the hash: the `*_at`/date metadata keys and the
`sshs_*` hashes computed over them in LoRA files, the base model's file hash, the `time`/`seconds`
fields of train_log.jsonl, the time stamp in sample file names, and the TensorBoard event files.
Everything else (every tensor, every other metadata key, every pixel) must match bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TIME_KEYS = {"ss_training_started_at", "ss_training_finished_at", "modelspec.date", "sshs_model_hash",
             "sshs_legacy_hash",
             "ss_new_sd_model_hash"}  # the tiny checkpoints are written anew; safetensors orders their metadata at random


def make_dataset(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    img = root / "img"
    for name, n in (("3_alpha", 3), ("2_beta", 2)):
        d = img / name
        d.mkdir(parents=True)
        tag = name.split("_", 1)[1]
        for i in range(n):
            w, h = (64, 64) if i % 2 == 0 else (64, 96)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{tag}{i}.png")
            (d / f"{tag}{i}.txt").write_text(f"{tag}, red, blue background, tag{i}")
    reg = root / "reg" / "1_thing"
    reg.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(reg / f"r{i}.png")
    (root.parent / "prompts.txt").write_text("alpha, red --w 64 --h 64 --d 5 --s 3 --l 4\nbeta --n blurry --w 64 --h 96 --s 2\n")
    return img, root / "reg"


def configs(root: Path, ckpt: dict[str, Path], img: Path, reg: Path) -> dict[str, dict]:
    base = {"train_data_dir": img, "resolution": 64, "network_dim": 4, "network_alpha": 2, "learning_rate": "1e-3",
            "train_batch_size": 2, "seed": 1, "save_precision": "float", "device": "cpu", "output_name": "lora",
            "pretrained_model_name_or_path": ckpt["sd1"]}
    bucket = {"enable_bucket": "true", "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 32}
    return {
        "sd1_lora_te": {**base, **bucket, "reg_data_dir": reg, "max_train_epochs": 2, "save_every_n_epochs": 1,
                        "sample_prompts": root / "prompts.txt", "sample_every_n_epochs": 1, "shuffle_caption": "true",
                        "keep_tokens": 1, "flip_aug": "true", "network_dropout": 0.1, "caption_tag_dropout_rate": 0.2,
                        "noise_offset": 0.05, "lr_scheduler": "cosine"},
        "sd1_locon": {**base, "max_train_steps": 4, "network_args": "conv_dim=4 conv_alpha=2 rank_dropout=0.1",
                      "scale_weight_norms": 0.5, "min_snr_gamma": 5, "multires_noise_iterations": 4,
                      "optimizer_type": "Prodigy", "learning_rate": "1.0", "cache_latents": "true",
                      "save_every_n_steps": 2, "save_state": "true"},
        "sd2_v": {**base, "pretrained_model_name_or_path": ckpt["sd2"], "max_train_steps": 3,
                  "v_parameterization": "true", "caption_dropout_rate": 0.3},
        "sdxl_cached_te": {**base, **bucket, "pretrained_model_name_or_path": ckpt["sdxl"], "max_train_epochs": 2,
                           "network_train_unet_only": "true", "cache_text_encoder_outputs": "true",
                           "flip_aug": "true", "sample_prompts": root / "prompts.txt", "sample_every_n_epochs": 2},
        "sd1_accum_bf16": {**base, "max_train_steps": 3, "gradient_accumulation_steps": 2, "mixed_precision": "bf16",
                           "gradient_checkpointing": "true", "max_token_length": 150, "clip_skip": 2,
                           "save_precision": "bf16", "lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 0.5},
        "sd1_fp16": {**base, "max_train_steps": 2, "mixed_precision": "fp16", "save_precision": "fp16",
                     "optimizer_type": "Lion", "learning_rate": "1e-4"},
        "resume_straight": {**base, "reg_data_dir": reg, "max_train_epochs": 4, "save_every_n_epochs": 2,
                            "save_state": "true", "network_dropout": 0.1, "shuffle_caption": "true",
                            "caption_tag_dropout_rate": 0.2, "flip_aug": "true", "noise_offset": 0.05,
                            "lr_scheduler": "cosine"},
    }


def hash_file(path: Path) -> str:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        h = hashlib.sha256()
        with safe_open(str(path), "pt") as f:
            md = {k: v for k, v in (f.metadata() or {}).items() if k not in TIME_KEYS}
            h.update(json.dumps(md, sort_keys=True).encode())
            for k in sorted(f.keys()):
                t = f.get_tensor(k).contiguous()
                h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
        return h.hexdigest()
    if path.name == "train_log.jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows = [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in rows]
        return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    if path.name == "train_state.json":
        doc = json.loads(path.read_text())
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hash_tree(out: Path) -> dict[str, str]:
    """{relative path: hash}; sample names lose their _YYYYmmddHHMMSS part."""
    return {re.sub(r"_\d{14}", "", str(p.relative_to(out))): hash_file(p) for p in sorted(out.rglob("*"))
            if p.is_file() and "events.out.tfevents" not in p.name}


def run_cli(overrides: dict, env: dict | None = None, launcher: list[str] | None = None) -> None:
    args = [a for k, v in overrides.items() for a in (f"--{k}", str(v))]
    cmd = (launcher or [sys.executable]) + ["-m", "loralab.cli", "train", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="empty folder for models, data and outputs")
    ap.add_argument("--out", type=Path, required=True, help="JSON file of {config: {file: sha256}}")
    ap.add_argument("--compare", type=Path, help="an earlier --out file: print differences, exit 1 if any")
    ap.add_argument("--only", nargs="*", help="run only these configs")
    ap.add_argument("--hash-only", action="store_true", help="train nothing: hash the outputs already in --work")
    a = ap.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    from loralab.models.loader import save_single_file
    from loralab.models.tiny import tiny_sd_components

    if a.hash_only:
        result = {p.name: hash_tree(p) for p in sorted((a.work / "out").iterdir())}
        return finish(a, result)
    a.work.mkdir(parents=True, exist_ok=True)
    ckpt = {}
    for fam in ("sd1", "sd2", "sdxl"):
        c = tiny_sd_components(fam, seed=0)
        tes = [c["text_encoder"]] + ([c["text_encoder_2"]] if "text_encoder_2" in c else [])
        ckpt[fam] = a.work / f"tiny_{fam}.safetensors"
        save_single_file(ckpt[fam], c["unet"], c["vae"], tes, family=fam)
    img, reg = make_dataset(a.work / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    result: dict[str, dict[str, str]] = {}
    for name, cfg in configs(a.work, ckpt, img, reg).items():
        if a.only and name not in a.only:
            continue
        out = a.work / "out" / name
        run_cli({**cfg, "output_dir": out}, env=env)
        result[name] = hash_tree(out)
        print(f"{name}: {len(result[name])} files", flush=True)
        if name == "resume_straight":  # then continue its epoch-2 state in another folder
            out2 = a.work / "out" / "resume_resumed"
            run_cli({**cfg, "output_dir": out2, "resume": out / "lora-000002-state"}, env=env)
            result["resume_resumed"] = hash_tree(out2)
            print(f"resume_resumed: {len(result['resume_resumed'])} files", flush=True)
    if not a.only or "ddp2" in a.only:
        cfg = configs(a.work, ckpt, img, reg)["sd1_locon"]
        cfg = {**cfg, "output_dir": a.work / "out" / "ddp2", "save_state": "false"}
        # torchrun: `accelerate launch --cpu --num_processes 2` starts one process only (accelerate 1.x)
        run_cli(cfg, env=env, launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"])
        result["ddp2"] = hash_tree(a.work / "out" / "ddp2")
        print(f"ddp2: {len(result['ddp2'])} files", flush=True)
    finish(a, result)


def finish(a: argparse.Namespace, result: dict[str, dict[str, str]]) -> None:
    a.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    if a.compare:
        before = json.loads(a.compare.read_text())
        bad = 0
        for name in sorted(set(before) | set(result)):
            b, r = before.get(name, {}), result.get(name, {})
            for f in sorted(set(b) | set(r)):
                if b.get(f) != r.get(f):
                    bad += 1
                    print(f"DIFF {name}/{f}: {b.get(f, 'missing')[:12]} -> {r.get(f, 'missing')[:12]}")
        n = sum(len(v) for v in result.values())
        print(f"{n - bad} of {n} files identical" if bad else f"all {n} files identical")
        raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
