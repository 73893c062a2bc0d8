"""Pivotal tuning against a plain LoRA on the lab model: teach the ring with a brand-new token.

    OMP_NUM_THREADS=1 python tools/pivotal_lab.py --out out/pivotal_lab   # 6.5 min on a 2-core CPU, 1 thread

Both runs train the same dataset (the demo's 15 rings, captioned "vexdef, <colour>, <bg> background,
<size>"; `vexdef` is no word of the vocabulary: the tokenizer reads it as vex + def), the same LoRA
(the demo's recipe: UNet only, dim 8, AdamW 1e-3, min-SNR 5, no reg images) for the same steps:
(a) a plain LoRA, the token being its word pieces; (b) pivotal tuning, `vexdef` a new token from the
init word (`circle` by default) trained with the LoRA (`loralab.recipes.pivotal`). Every `--every`-th saved
epoch is scored as the demo scores it (`loralab.lab.demo.score_images`): concept = the share of `vexdef`
prompts (colour/background pairs the dataset lacks) the lab evaluator reads as a ring; retention = the
smallest of shape/colour/background accuracy on held-out base prompts (no token) relative to the base
model. Pivotal files are loaded as `loralab generate` loads them (the embedding bundled in the LoRA).
Prints a table and writes results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from loralab.lab import world as W
from loralab.lab.demo import DemoEval, DemoRecipe, base_prompts, dataset_pairs, epoch_files, score_images, tag_prompts
from loralab.lab.demo import train_config
from loralab.lab.evaluator import Evaluator
from loralab.lab.model import LabModel, evaluator_path
from loralab.models.embeddings import add_new_token, clear_new_tokens
from loralab.models.text import tokenize
from loralab.network.files import embedding_parts, read_weights, split_bundle
from loralab.network.lora import LoRANetwork
from loralab.recipes import recipe_for
from loralab.train.loop import fit

TOKEN = "vexdef"


class TokenLabModel(LabModel):
    """The lab model with prompts tokenized by `models/text.py` (new tokens included); the same ids as
    `LabModel.encode` for any prompt without new tokens."""

    @torch.no_grad()
    def encode(self, texts):
        ids = tokenize(self.tok, list(texts))
        return self.te(ids.to(self.device)).last_hidden_state.float()


def apply_file(model: TokenLabModel, path: Path):
    """Load a LoRA file onto the lab model as `loralab generate` does: its bundled embeddings become new
    tokens, the rest is the network. Returns the network (restore it and clear the tokens after)."""
    sd, bundled = split_bundle(read_weights(path))
    for token, data in bundled.items():
        add_new_token([model.tok], [model.te], token, embedding_parts(data, "sd1", str(path)))
    net = LoRANetwork.from_weights(sd, model.unet, [model.te], "sd1")
    net.to(model.device, dtype=torch.float32)
    net.eval()
    net.apply_to()
    return net


def evaluate(model, evaluator, path: Path | None, tag_items, base_items, ev: DemoEval, reference, epoch: int):
    net = apply_file(model, path) if path is not None else None
    try:
        tag_imgs = model.generate(tag_items, [it.caption(tag=TOKEN) for it in tag_items], steps=ev.ddim_steps,
                                  cfg=ev.cfg, seed=ev.seed)
        base_imgs = model.generate(base_items, [it.caption() for it in base_items], steps=ev.ddim_steps,
                                   cfg=ev.cfg, seed=ev.seed)
    finally:
        if net is not None:
            net.restore()
        clear_new_tokens([model.tok], [model.te])
    score, _, _ = score_images(evaluator, tag_items, tag_imgs, base_items, base_imgs, reference, epoch)
    return score


def train_run(name: str, recipe: DemoRecipe, data: Path, out: Path) -> tuple[list[Path], float, int]:
    cfg = train_config(recipe, data, None, out / name, "cpu")
    cfg.output_name = name
    r = recipe_for(cfg)
    t0 = time.perf_counter()
    result = fit(r.prepare(cfg), r)
    return epoch_files(out / name, name, result.epochs), time.perf_counter() - t0, result.global_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/pivotal_lab"))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--init-word", default="circle")
    ap.add_argument("--embedding-lr", type=float, default=1e-3, help="the new token's lr (the LoRA's: 1e-3)")
    ap.add_argument("--stop-embedding-training", type=int, default=0)
    ap.add_argument("--vectors", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="plain,pivotal", help="which runs: plain, pivotal or both (default)")
    ap.add_argument("--every", type=int, default=4, help="score every k-th epoch (and the last)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    data = args.out / "data"
    W.write_kohya_dataset(data, tag=TOKEN, n=15, repeats=args.repeats, seed=args.seed)
    common = {"save_every_n_epochs": 1, "network_train_unet_only": True}
    plain = DemoRecipe(max_train_epochs=args.epochs, repeats=args.repeats, seed=args.seed, extra=common)
    pivotal = DemoRecipe(max_train_epochs=args.epochs, repeats=args.repeats, seed=args.seed, extra={
        **common, "token_string": TOKEN, "init_word": args.init_word, "embedding_lr": args.embedding_lr,
        "num_vectors_per_token": args.vectors, "stop_embedding_training": args.stop_embedding_training})
    ev = DemoEval()
    model = TokenLabModel.load("cpu")
    evaluator = Evaluator.load(evaluator_path())
    tag_items = tag_prompts(ev.n_tag_prompts, dataset_pairs(next(data.glob(f"*_{TOKEN}"))), tag=TOKEN)
    base_items = base_prompts(ev.n_base_prompts)
    base = evaluate(model, evaluator, None, tag_items, base_items, ev, None, 0)
    rows, results = [], {"base": base.__dict__, "args": {k: str(v) for k, v in vars(args).items()}}
    for name, recipe in (("plain", plain), ("pivotal", pivotal)):
        if name not in args.runs.split(","):
            continue
        files, train_s, steps = train_run(name, recipe, data, args.out)
        t0 = time.perf_counter()
        scores = [evaluate(model, evaluator, f, tag_items, base_items, ev, base.base, e)
                  for e, f in enumerate(files, 1) if e % args.every == 0 or e == len(files)]
        results[name] = {"train_s": train_s, "eval_s": time.perf_counter() - t0, "steps": steps,
                         "epochs": [s.__dict__ for s in scores]}
        rows += [(name, s.epoch, steps * s.epoch // len(files), s.concept, s.retention["min"], s.base_as_concept)
                 for s in scores]
        print(f"{name}: {steps} steps trained in {train_s:.0f} s, scored in {time.perf_counter() - t0:.0f} s",
              flush=True)
    print(f"\nbase model: concept {base.concept:.0%}; base-prompt accuracy shape {base.base['shape']:.0%}, "
          f"colour {base.base['colour']:.0%}, background {base.base['background']:.0%}")
    print(f"{'run':8} {'epoch':>5} {'steps':>5} {'concept':>8} {'retention':>9} {'leak':>5}")
    for name, e, st, concept, ret, leak in rows:
        print(f"{name:8} {e:5d} {st:5d} {concept:8.0%} {ret:9.0%} {leak:5.0%}")
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
