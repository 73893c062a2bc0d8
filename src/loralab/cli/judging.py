"""The commands that draw with a LoRA or a base model: `generate`, `reg-images`, `attention`, `bleed`, `probe`,
`review`."""

from __future__ import annotations

import argparse
from pathlib import Path

from loralab.cli.dataset import _resolution
from loralab.errors import LoralabError


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.review.generate import generate, parse_lora_arg
    from loralab.train.sampling import parse_prompt_file, parse_prompt_line

    prompts = [parse_prompt_line(t, where=f"prompt {i + 1}") for i, t in enumerate(args.prompt)]
    if args.prompts:
        prompts += parse_prompt_file(args.prompts)
    if not prompts:
        raise LoralabError("generate: give at least one prompt (\"a prompt --d 1\") or --prompts FILE")
    loras = [parse_lora_arg(t) for t in args.lora]
    paths = generate(args.model, prompts, args.out, loras=loras, embeddings=args.embedding, device=args.device,
                     precision=args.precision,
                     sampler=args.sampler,
                     seed=args.seed, clip_skip=args.clip_skip, max_token_length=args.max_token_length,
                     v_parameterization=args.v_parameterization)
    for path in paths:
        print(path)
    return 0


def _add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="images from a base model with LoRAs at chosen weights (fixed seeds)",
                       description="Each prompt in kohya's line syntax: 'prompt --n neg --w 512 --h 512 --d seed "
                                   "--s steps --l cfg --ss sampler'.")
    g.add_argument("prompt", nargs="*", help="prompts (kohya line syntax)")
    g.add_argument("--model", required=True, help="base model: single file or diffusers folder")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA file and its weight (default 1.0); repeat to stack")
    g.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion embedding; its file name is its token (vexdef.safetensors: vexdef)")
    g.add_argument("--prompts", help="prompt file (.txt lines in kohya syntax, .toml, .json)")
    g.add_argument("--out", default="generated", help="output folder (default: generated)")
    g.add_argument("--seed", type=int, default=0, help="seed of prompt i without --d: seed + i (default 0)")
    g.add_argument("--sampler", default="", help="sampler (default ddim; euler_a for SDXL)")
    g.add_argument("--clip-skip", type=int, default=0, help="as in training (2 for NAI-style anime models)")
    g.add_argument("--max-token-length", type=int, default=75, choices=(75, 150, 225), help="as in training")
    g.add_argument("--v-parameterization", action="store_true", help="a v-prediction model (SD 2.x 768-v)")
    g.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="UNet compute dtype")
    g.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    g.set_defaults(func=cmd_generate)


def cmd_reg_images(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.review.reg_images import RegRequest, RegSettings, read_prompts_file, reg_images

    prompts = list(args.prompt) + (read_prompts_file(args.prompts) if args.prompts else [])
    req = RegRequest(model=args.model, prompts=prompts, out=args.out, count=args.count, resolution=args.resolution,
                     dataset=args.dataset, enable_bucket=args.enable_bucket, min_bucket_reso=args.min_bucket_reso,
                     max_bucket_reso=args.max_bucket_reso, bucket_reso_steps=args.bucket_reso_steps,
                     bucket_no_upscale=args.bucket_no_upscale, repeats=args.repeats, seed=args.seed,
                     settings=RegSettings(steps=args.steps, cfg=args.cfg, sampler=args.sampler.strip().lower(),
                                          batch_size=args.batch_size),
                     device=args.device, precision=args.precision, clip_skip=args.clip_skip,
                     v_parameterization=args.v_parameterization)
    print("\n".join(reg_images(req).lines()))
    return 0


def _add_reg_images_parser(sub) -> None:
    r = sub.add_parser("reg-images", help="regularization images from the base model, in kohya's reg layout "
                                          "(DDIM, fixed seeds, the class prompt as caption; resumable)",
                       description="Writes OUT/<repeats>_<prompt>/NNNN.png + NNNN.txt (caption = the prompt) with "
                                   "the guide's recipe: the base model you train on, DDIM, no negative prompt, image "
                                   "i from seed SEED+i. Rerunning the same command keeps the complete images and "
                                   "draws the missing ones. With --dataset, the count is spread over the training "
                                   "dataset's bucket resolutions in proportion to each bucket's training samples "
                                   "(images x repeats).")
    r.add_argument("--model", required=True, help="base model you train on: single file or diffusers folder")
    r.add_argument("--prompt", action="append", default=[],
                   help="class prompt, also the caption (e.g. \"woman\"); repeat for several classes")
    r.add_argument("--prompts", default="", help="file with one class prompt per line (# comments)")
    r.add_argument("--count", type=int, required=True, help="images per prompt")
    r.add_argument("--out", required=True, help="reg_data_dir to write (one <repeats>_<prompt>/ folder per prompt)")
    r.add_argument("--resolution", type=_resolution, default=None,
                   help="W,H or one size: the images' size; with --dataset, the training resolution of the buckets "
                        "(default: the model's own, 512 SD 1.x, 1024 SDXL, 32 the lab model)")
    r.add_argument("--dataset", default="", help="train_data_dir: draw at its bucket resolutions")
    r.add_argument("--repeats", type=int, default=1, help="repeats prefix of the folders (default 1)")
    r.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    r.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    r.add_argument("--cfg", type=float, default=7.5, help="CFG scale against the empty prompt (default 7.5)")
    r.add_argument("--sampler", default="ddim", help="sampler (default ddim, the guide's; deterministic, so resumed "
                                                     "images match)")
    r.add_argument("--batch-size", type=int, default=4, help="images per UNet call (default 4)")
    b = r.add_argument_group("buckets of --dataset (kohya names, as in training)")
    b.add_argument("--no-bucket", dest="enable_bucket", action="store_false", help="one bucket: the resolution")
    b.add_argument("--min-bucket-reso", type=int, default=256)
    b.add_argument("--max-bucket-reso", type=int, default=1024)
    b.add_argument("--bucket-reso-steps", type=int, default=64)
    b.add_argument("--bucket-no-upscale", action="store_true")
    r.add_argument("--clip-skip", type=int, default=0, help="as in training (2 for NAI-style anime models)")
    r.add_argument("--v-parameterization", action="store_true", help="a v-prediction model (SD 2.x 768-v)")
    r.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="UNet compute dtype")
    r.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    r.set_defaults(func=cmd_reg_images)


def cmd_attention(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.review.attention import attention
    from loralab.review.generate import parse_lora_arg
    from loralab.train.sampling import parse_prompt_line

    prompt = parse_prompt_line(args.prompt, where="prompt")
    words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words else []
    result = attention(args.model, prompt, args.out, words=words, loras=[parse_lora_arg(t) for t in args.lora],
                       embeddings=args.embedding, device=args.device, precision=args.precision, seed=args.seed, sampler=args.sampler,
                       clip_skip=args.clip_skip, max_token_length=args.max_token_length)
    for row in result["rows"]:
        print(f"{row['label']}:")
        for word, other in row["mass_inside"].items():
            top = max(other.items(), key=lambda kv: kv[1]) if other else None
            share = row["words"][word]["region_share"]
            print(f"  {word!r}: region {share:.0%} of the image"
                  + (f"; {top[1]:.0%} of its map inside {top[0]!r}" if top else ""))
    print(f"maps: {args.out}/sheet.png, attention.json")
    return 0


def _add_attention_parser(sub) -> None:
    a = sub.add_parser("attention", help="where each word of a prompt acts: DAAM cross-attention heat maps",
                       description="Draws the prompt (kohya line syntax: 'prompt --w 512 --h 512 --d seed --s steps "
                                   "--l cfg') and, per word, the DAAM heat map of its cross-attention; with --lora, "
                                   "the base model and the LoRA on the same seed.")
    a.add_argument("prompt", help="the prompt (kohya line syntax)")
    a.add_argument("--model", required=True, help="base model: single file or diffusers folder")
    a.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA file and its weight (default 1.0); repeat to stack")
    a.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion embedding, drawn with the LoRA row; its file name is its token")
    a.add_argument("--words", default="", help="comma-separated words or tags to map (default: each tag of the prompt)")
    a.add_argument("--out", default="attention", help="output folder (default: attention)")
    a.add_argument("--seed", type=int, default=0, help="seed when the prompt has no --d (default 0)")
    a.add_argument("--sampler", default="", help="sampler (default ddim; euler_a for SDXL)")
    a.add_argument("--clip-skip", type=int, default=0, help="as in training (2 for NAI-style anime models)")
    a.add_argument("--max-token-length", type=int, default=75, choices=(75, 150, 225), help="as in training")
    a.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="UNet compute dtype")
    a.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    a.set_defaults(func=cmd_attention)


def cmd_bleed(args: argparse.Namespace, extra: list[str]) -> int:

    from loralab.review.bleed import BleedOptions, bleed
    from loralab.review.generate import parse_lora_arg

    spec = parse_lora_arg(args.lora)
    size = _resolution(args.size) if args.size else (0, 0)
    opts = BleedOptions(model=args.model, lora=spec.path, weight=spec.weight,
                        tags=[t.strip() for t in args.tags.split(",") if t.strip()] if args.tags else [],
                        dataset=args.dataset or "", class_word=args.class_word, contexts=list(args.context),
                        seeds=args.seeds, seed=args.seed, steps=args.steps, scale=args.cfg, sampler=args.sampler,
                        out=args.out, device=args.device, precision=args.precision, clip_skip=args.clip_skip,
                        caption_extension=args.caption_extension, embeddings=list(args.embedding))
    if size != (0, 0):
        opts.width, opts.height = size
    judge = None if args.no_lab_scores else _lab_shape_reader(args.model, args.device)
    result = bleed(opts, judge=judge, progress=lambda s: print(s, flush=True))
    for line in result["fixes"] or ["no bleeding found"]:
        print(f"- {line}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _is_lab_model(model: str | Path) -> bool:
    """True when `model` is the shipped lab model (whose evaluator can judge its images)."""
    from loralab.lab.model import lab_model_path

    return bool(model) and Path(model).exists() and Path(model).resolve() == lab_model_path().resolve()


def _lab_shape_reader(model: str, device: str):
    """The lab evaluator as an image judge for `bleed` and `probe`, when `model` is the lab model; else None."""
    if not _is_lab_model(model):
        return None
    from loralab.lab.judge import shape_reader

    return shape_reader(device or "cpu")


def _add_bleed_parser(sub) -> None:
    b = sub.add_parser("bleed", help="do a LoRA's concepts bleed through the token pieces their tags share?",
                       description="Probes each activation tag, each of its token pieces, the class word and each pair "
                                   "of tags, with and without the LoRA on the same seeds; reports the pieces that "
                                   "carry a concept by themselves, the dominant concept and the guide's fixes.")
    b.add_argument("--model", required=True, help="base model: single file or diffusers folder")
    b.add_argument("--lora", required=True, metavar="FILE[:WEIGHT]", help="the LoRA file and its weight (default 1.0)")
    b.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion embedding loaded with the LoRA; its file name is its token")
    b.add_argument("--dataset", help="the training folder (kohya layout): activation tags, images x repeats, balance")
    b.add_argument("--tags", default="", help="comma-separated tags to probe (default: the dataset's activation tags)")
    b.add_argument("--class-word", default="", help="the class word to probe too (e.g. woman, shape)")
    b.add_argument("--context", action="append", default=[],
                   help="tags after each probe, e.g. '1girl, solo' (repeat: cycled over the seeds)")
    b.add_argument("--seeds", type=int, default=4, help="seeds per probe (default 4)")
    b.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    b.add_argument("--size", default="", help="image size W,H (default: the model's own, e.g. 512 for SD 1.x, 1024 for SDXL, 32 for the lab model)")
    b.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    b.add_argument("--cfg", type=float, default=7.5, help="guidance scale (default 7.5)")
    b.add_argument("--sampler", default="", help="sampler (default ddim; euler_a for SDXL)")
    b.add_argument("--caption-extension", default=".txt", help="caption files' extension (default .txt)")
    b.add_argument("--no-lab-scores", action="store_true", help="on the lab model: skip the evaluator's reading")
    b.add_argument("--out", default="bleed", help="output folder (default: bleed)")
    b.add_argument("--clip-skip", type=int, default=0, help="as in training (2 for NAI-style anime models)")
    b.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="UNet compute dtype")
    b.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    b.set_defaults(func=cmd_bleed)


def cmd_probe(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.review.generate import parse_lora_arg
    from loralab.review.probe import ProbeOptions, probe, summary

    size = _resolution(args.size) if args.size else (0, 0)
    opts = ProbeOptions(model=args.model, tag=args.tag, class_word=args.class_word, contexts=list(args.context),
                        seeds=args.seeds, seed=args.seed, stand_ins=args.stand_ins, width=size[0], height=size[1],
                        steps=args.steps, scale=args.cfg, sampler=args.sampler, out=args.out, device=args.device,
                        precision=args.precision, clip_skip=args.clip_skip,
                        loras=[parse_lora_arg(t) for t in args.lora], embeddings=list(args.embedding))
    judge = None if args.no_lab_scores else _lab_shape_reader(args.model, args.device)
    result = probe(opts, judge=judge, progress=lambda s: print(s, flush=True))
    for line in summary(result):
        print(line)
    print(f"images: {Path(args.out) / 'probe.png'}, figures: {Path(args.out) / 'probe.json'}")
    return 0


def _add_probe_parser(sub) -> None:
    p = sub.add_parser("probe", help="does the base model already know a tag? (a new concept or a modified one)",
                       description="Draws the tag in its context, the context without it, the class word and made-up "
                                   "stand-ins in its place, on the same seeds; says whether the base model knows the "
                                   "tag and what the guide advises.")
    p.add_argument("tag", help="the activation tag to probe")
    p.add_argument("--model", required=True, help="base model: single file or diffusers folder")
    p.add_argument("--class", dest="class_word", default="", help="the class word (e.g. woman, dog, shape)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="probe the model with this LoRA applied (repeatable; a pivotal LoRA's bundled tokens load)")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion embedding loaded first; its file name is its token")
    p.add_argument("--context", action="append", default=[],
                   help="the prompt around the tag, {} marks its place (else 'tag, context'); repeat: cycled over "
                        "the seeds (e.g. 'photo of {} woman, outdoors')")
    p.add_argument("--seeds", type=int, default=8, help="seeds per prompt (default 8)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--stand-ins", type=int, default=4, help="made-up words the tag is compared with (default 4)")
    p.add_argument("--size", default="", help="image size W,H (default: the model's own, 32 for the lab model)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--sampler", default="", help="sampler (default ddim; euler_a for SDXL)")
    p.add_argument("--no-lab-scores", action="store_true", help="on the lab model: skip the evaluator's reading")
    p.add_argument("--out", default="probe", help="output folder (default: probe)")
    p.add_argument("--clip-skip", type=int, default=0, help="as in training (2 for NAI-style anime models)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="UNet compute dtype")
    p.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=cmd_probe)


def cmd_review(args: argparse.Namespace, extra: list[str]) -> int:

    from loralab.review.review import ReviewOptions, review_run

    try:
        weights = tuple(float(w) for w in args.weights.split(","))
    except ValueError:
        raise LoralabError(f"--weights {args.weights!r}: comma-separated numbers, e.g. 0,0.5,1,1.5,2") from None
    opts = ReviewOptions(model=args.model, prompts=args.prompts, out=args.out, name=args.name, weights=weights,
                         device=args.device, precision=args.precision, batch_size=args.batch_size, seed=args.seed,
                         max_prompts=args.max_prompts)
    judge = None if args.no_lab_scores else _lab_judge(Path(args.folder), opts)
    result = review_run(Path(args.folder), opts, judge=judge)
    print(f"review: {result.report}")
    print(f"recommended epoch: {result.recommended}" + ("  (overfitting alarm: see the review)" if result.alarm else ""))
    return 0


def _lab_judge(folder, opts):
    """The lab evaluator as the review's ground truth, when the run was trained on the shipped lab model."""

    from loralab.review.runlog import read_run

    model = opts.model or read_run(folder, opts.name).config.get("pretrained_model_name_or_path") or ""
    if not _is_lab_model(model):
        return None
    from loralab.lab.judge import lab_judge

    return lab_judge(folder, opts.name, device=opts.device or "cpu")


def _add_review_parser(sub) -> None:
    r = sub.add_parser("review", help="judge a run's epochs: loss graph, sample grid, weight sweep, memorisation, "
                                      "recommended epoch and overfitting alarm",
                       description="Reads OUTPUT_DIR (a training run's folder: train_log.jsonl and the epoch files) "
                                   "and writes OUTPUT_DIR/review/review.md with PNGs.")
    r.add_argument("folder", metavar="OUTPUT_DIR", help="the run's output_dir")
    r.add_argument("--model", default="", help="base model (default: the one the run logged)")
    r.add_argument("--prompts", default="", help="prompt file, kohya syntax (default: the run's sample_prompts, "
                                                 "else its training captions)")
    r.add_argument("--weights", default="0,0.5,1,1.5,2", help="LoRA weights of the sweep (default 0,0.5,1,1.5,2)")
    r.add_argument("--out", default="", help="output folder (default: OUTPUT_DIR/review)")
    r.add_argument("--name", default="", help="output_name, when the folder holds several runs")
    r.add_argument("--max-prompts", type=int, default=8, help="at most this many prompts (default 8)")
    r.add_argument("--seed", type=int, default=0, help="seed of prompt i without --d: seed + i (default: the run's seed)")
    r.add_argument("--batch-size", type=int, default=8, help="images per UNet call (default 8)")
    r.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="UNet compute dtype")
    r.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    r.add_argument("--no-lab-scores", action="store_true",
                   help="on a lab-model run, skip the lab evaluator's scores (faster)")
    r.set_defaults(func=cmd_review)

