"""`loralab` command line: one entry point, each command a thin function that parses and calls the library.

User errors (`LoralabError`) are printed as one message without a traceback; `--debug` shows it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loralab.errors import LoralabError

log = logging.getLogger("loralab")
# bitsandbytes warns at import about an optional CPU 4-bit kernel package that LoRA training never uses
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.config import build_config, config_help
    from loralab.config.kohya import parse_command_line

    if args.help:
        print(TRAIN_USAGE)
        print(config_help())
        return 0
    overrides = parse_command_line(extra)
    sources: dict[str, str] = {}
    cfg = build_config(args.config, overrides, sources=sources)
    if args.dry_run:
        from loralab.train.dry_run import dry_run

        print(dry_run(cfg, sources))
        return 0
    from loralab.recipes.lora import train

    result = train(cfg)
    return 130 if result.interrupted else 0


# ----------------------------------------------------------------------------------------- dataset tools


def _resolution(text: str) -> tuple[int, int]:
    """kohya's `resolution` for the dataset tools: the training config's one rule (config.parse_resolution)."""
    from loralab.config import parse_resolution

    try:
        return parse_resolution(text)
    except LoralabError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_bucket_args(p: argparse.ArgumentParser, batch: bool = True) -> None:
    g = p.add_argument_group("training resolution and buckets (kohya names)")
    g.add_argument("--resolution", type=_resolution, default=(512, 512), help="512 or W,H (default 512)")
    if batch:
        g.add_argument("--batch-size", type=int, default=1, help="train_batch_size (default 1)")
    g.add_argument("--enable-bucket", dest="enable_bucket", action="store_true", default=True,
                   help="aspect-ratio buckets (default on)")
    g.add_argument("--no-bucket", dest="enable_bucket", action="store_false",
                   help="one bucket: every image resized and center-cropped to the resolution")
    g.add_argument("--min-bucket-reso", type=int, default=256)
    g.add_argument("--max-bucket-reso", type=int, default=1024)
    g.add_argument("--bucket-reso-steps", type=int, default=64)
    g.add_argument("--bucket-no-upscale", action="store_true")


def _bucket_settings(args: argparse.Namespace):
    from loralab.analyze.dataset_check import BucketSettings

    return BucketSettings(
        resolution=args.resolution,
        batch_size=getattr(args, "batch_size", 1),
        enable_bucket=args.enable_bucket,
        min_bucket_reso=args.min_bucket_reso,
        max_bucket_reso=args.max_bucket_reso,
        bucket_reso_steps=args.bucket_reso_steps,
        bucket_no_upscale=args.bucket_no_upscale,
    )


def _caption_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--caption-extension", default=".txt", help="caption file extension (default .txt)")


def cmd_dataset_check(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.analyze.dataset_check import check_dataset, render_report

    if args.batch_size < 1:
        raise LoralabError(f"--batch-size {args.batch_size} must be at least 1")
    if args.dataset_config:
        return _check_dataset_config(args)
    if not args.dir:
        raise LoralabError("dataset check: give DIR (a train_data_dir) or --dataset-config FILE")
    report = check_dataset(args.dir, args.reg, settings=_bucket_settings(args),
                           caption_extension=args.caption_extension, max_tokens=args.max_token_length,
                           progress=not args.json)
    print(report.to_json() if args.json else render_report(report))
    return 1 if report.has_errors else 0


def _check_dataset_config(args: argparse.Namespace) -> int:
    """`dataset check --dataset-config FILE`: one report per [[datasets]]; the bucket options given on the
    command line stand for the training config's (the fallback of keys the file leaves out)."""
    from loralab.analyze.dataset_check import check_dataset_config, render_report

    if args.dir:
        raise LoralabError("dataset check: give DIR or --dataset-config FILE, not both")
    defaults = {"caption_extension": args.caption_extension, "train_batch_size": args.batch_size,
                "resolution": args.resolution, "enable_bucket": args.enable_bucket,
                "min_bucket_reso": args.min_bucket_reso, "max_bucket_reso": args.max_bucket_reso,
                "bucket_reso_steps": args.bucket_reso_steps, "bucket_no_upscale": args.bucket_no_upscale}
    reports = check_dataset_config(args.dataset_config, defaults=defaults, max_tokens=args.max_token_length,
                                   progress=not args.json)
    print("[" + ",".join(r.to_json() for r in reports) + "]" if args.json else
          "\n\n".join(f"[[datasets]] #{i}\n{render_report(r)}" for i, r in enumerate(reports, 1)))
    return 1 if any(r.has_errors for r in reports) else 0


def cmd_dataset_tags(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.analyze.tags import analyze_tags, render_tags

    if not 0 < args.threshold <= 1:
        raise LoralabError(f"--threshold {args.threshold} must be a share between 0 and 1, e.g. 0.5")
    dataset = None
    if args.dataset_config:
        from loralab.analyze.scan import scan_dataset_config

        if args.dir or args.reg:
            raise LoralabError("dataset tags: give DIR (and --reg) or --dataset-config FILE, not both")
        dataset = scan_dataset_config(args.dataset_config, args.caption_extension)
    elif not args.dir:
        raise LoralabError("dataset tags: give DIR (a train_data_dir) or --dataset-config FILE")
    report = analyze_tags(args.dir, args.reg, threshold=args.threshold,
                          compare=tuple(args.compare) if args.compare else None,
                          caption_extension=args.caption_extension, dataset=dataset)
    print(report.to_json() if args.json else render_tags(report))
    return 0


def _split_tag_args(values: list[str]) -> list[str]:
    """`--add "red hair, smile" hat` -> ["red hair", "smile", "hat"]."""
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def cmd_dataset_edit(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.analyze.edit import EditOp, edit_captions, undo_last_edit

    if args.undo:
        print(undo_last_edit(args.dir, force=args.force).summary())
        return 0
    if (args.position is not None or args.after_first) and not args.add:
        raise LoralabError("dataset edit: --position and --after-first go with --add")
    if args.remove:
        op = EditOp("remove", _split_tag_args(args.remove))
    elif args.add:
        position = 1 if args.after_first else args.position
        op = EditOp("add", _split_tag_args(args.add), position=position)
    elif args.replace:
        op = EditOp("replace", [args.replace[0]], new=args.replace[1])
    else:
        op = EditOp("move_first", [args.move_first])
    result = edit_captions(args.dir, op, dry_run=args.dry_run, caption_extension=args.caption_extension,
                           concept=args.concept)
    if args.dry_run:
        sys.stdout.write(result.diff())
    print(result.summary())
    return 0


def cmd_dataset_clean(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.analyze.clean import clean_dataset, render_clean

    report = clean_dataset(args.dir, args.out, overwrite=args.overwrite)
    print(render_clean(report))
    return 0


def cmd_tokens(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.analyze.tokens import (
        dataset_tokens,
        render_dataset_tokens,
        render_text_tokens,
        text_tokens,
    )

    if (args.dataset or args.dataset_config) and args.text:
        raise LoralabError("tokens: give either TEXT or --dataset DIR (or --dataset-config FILE), not both")
    if args.dataset_config:
        from loralab.analyze.scan import scan_dataset_config

        result = dataset_tokens(None, dataset=scan_dataset_config(args.dataset_config, args.caption_extension))
        print(result.to_json() if args.json else render_dataset_tokens(result))
        return 0
    if args.dataset:
        result = dataset_tokens(args.dataset, caption_extension=args.caption_extension)
        print(result.to_json() if args.json else render_dataset_tokens(result))
        return 0
    if not args.text:
        raise LoralabError('tokens: give tags, e.g. loralab tokens "jinxdef, blue hair", or --dataset DIR')
    text_result = text_tokens(args.text)
    print(text_result.to_json() if args.json else render_text_tokens(text_result))
    return 0


def cmd_vae_check(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.analyze.vae_check import render_vae, vae_check

    if args.dataset_config:
        from loralab.analyze.vae_check import vae_check_dataset_config

        if args.dir:
            raise LoralabError("vae-check: give DIR or --dataset-config FILE, not both")
        reports = vae_check_dataset_config(args.dataset_config, out=args.out, model=args.model, vae=args.vae,
                                           caption_extension=args.caption_extension, device=args.device,
                                           defaults={"caption_extension": args.caption_extension})
        print("\n\n".join(f"[[datasets]] #{Path(r.output).name.split('_')[-1]}\n{render_vae(r)}" for r in reports))
        return 0
    if not args.dir:
        raise LoralabError("vae-check: give DIR (a train_data_dir or image folder) or --dataset-config FILE")
    report = vae_check(args.dir, model=args.model, vae=args.vae, out=args.out, settings=_bucket_settings(args),
                       caption_extension=args.caption_extension, device=args.device)
    print(render_vae(report))
    return 0


def _add_dataset_parsers(sub) -> None:
    d = sub.add_parser("dataset", help="check, count, edit and clean a kohya-layout dataset (no GPU, no model)")
    dsub = d.add_subparsers(dest="dataset_command", required=True)

    c = dsub.add_parser("check", help="find image, caption and bucket problems",
                        description="Check a train_data_dir (<repeats>_<name>/ folders): images, captions, "
                                    "activation tags, buckets and batches. Exit status 1 when an error is found.")
    c.add_argument("dir", nargs="?", help="train_data_dir")
    c.add_argument("--reg", help="reg_data_dir")
    c.add_argument("--dataset-config", help="an sd-scripts dataset_config TOML instead of DIR: one report per [[datasets]]")
    _add_bucket_args(c)
    _caption_arg(c)
    c.add_argument("--max-token-length", type=int, default=75, help="kohya max_token_length (75, 150 or 225)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=cmd_dataset_check)

    t = dsub.add_parser("tags", help="tag frequency per concept, pruning candidates, rare tags")
    t.add_argument("dir", nargs="?", help="train_data_dir")
    t.add_argument("--reg", help="reg_data_dir")
    t.add_argument("--dataset-config", help="an sd-scripts dataset_config TOML instead of DIR (each folder once)")
    t.add_argument("--threshold", type=float, default=0.5, help="share of a concept's images (default 0.5)")
    t.add_argument("--compare", nargs=2, metavar=("CONCEPT_A", "CONCEPT_B"),
                   help="tags whose share differs most between two concepts")
    _caption_arg(t)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_dataset_tags)

    e = dsub.add_parser("edit", help="add, remove, replace or reorder tags in every caption (with backup and undo)")
    e.add_argument("dir", help="train_data_dir")
    ops = e.add_mutually_exclusive_group(required=True)
    ops.add_argument("--remove", nargs="+", metavar="TAG", help="remove these tags")
    ops.add_argument("--add", nargs="+", metavar="TAG", help="add these tags (at the end unless --position)")
    ops.add_argument("--replace", nargs=2, metavar=("OLD", "NEW"), help="rename a tag")
    ops.add_argument("--move-first", metavar="TAG", help="put this tag first where present")
    ops.add_argument("--undo", action="store_true", help="restore the captions of the last edit")
    where = e.add_mutually_exclusive_group()
    where.add_argument("--position", type=int, help="with --add: how many tags stay before the new ones (0 = first)")
    where.add_argument("--after-first", action="store_true", help="with --add: right after the first tag")
    e.add_argument("--concept", help="only this concept folder (e.g. 10_jinx or jinx)")
    e.add_argument("--dry-run", action="store_true", help="print the diff, change nothing")
    e.add_argument("--force", action="store_true", help="with --undo: restore captions changed since the edit")
    _caption_arg(e)
    e.set_defaults(func=cmd_dataset_edit)

    k = dsub.add_parser("clean", help="remove anti-AI-filter noise into a new folder (AdverseCleaner)")
    k.add_argument("dir", help="the dataset folder")
    k.add_argument("--out", required=True, help="new folder for the cleaned copies (outside DIR)")
    k.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    k.set_defaults(func=cmd_dataset_clean)


def _add_analysis_parsers(sub) -> None:
    _add_dataset_parsers(sub)
    k = sub.add_parser("tokens", help="CLIP tokens of tags; tokens that activation tags share and how to balance")
    k.add_argument("text", nargs="*", help='tags, e.g. "jinxdef, jinxarcane"')
    k.add_argument("--dataset", metavar="DIR", help="the activation tags of this train_data_dir")
    k.add_argument("--dataset-config", metavar="FILE", help="the activation tags of a dataset_config's folders")
    _caption_arg(k)
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_tokens)

    v = sub.add_parser("vae-check", help="round-trip each image through the VAE; PSNR and side-by-side PNGs")
    v.add_argument("dir", nargs="?", help="train_data_dir or a folder of images")
    v.add_argument("--dataset-config", help="an sd-scripts dataset_config TOML instead of DIR: each [[datasets]] "
                                            "at its own resolution")
    v.add_argument("--model", help="base model (its VAE is used)")
    v.add_argument("--vae", help="a VAE file or folder (instead of the model's)")
    v.add_argument("--out", help="output folder (default: DIR_vae_check next to DIR)")
    v.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    _add_bucket_args(v, batch=False)
    _caption_arg(v)
    v.set_defaults(func=cmd_vae_check)


TRAIN_USAGE = """usage: loralab train --config run.toml [--key value ...] [--dry-run]

Train a LoRA. The TOML keys are kohya-ss sd-scripts argument names; any key can also be given on the
command line (command line > TOML > default). Unknown keys and bad values are rejected before any model loads.
--dry-run checks the config and the dataset and prints every key with its source, the dataset's images,
repeats, buckets and steps, and the model family, without loading weights or writing anything.

keys (default, meaning):"""


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

    from loralab.lab.demo import run_demo

    report = run_demo(Path(args.out), device=args.device, quick=args.quick)
    print(f"report: {report}")
    return 0


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.review.generate import generate, parse_lora_arg
    from loralab.train.sampling import parse_prompt_file, parse_prompt_line

    prompts = [parse_prompt_line(t, where=f"prompt {i + 1}") for i, t in enumerate(args.prompt)]
    if args.prompts:
        prompts += parse_prompt_file(args.prompts)
    if not prompts:
        raise LoralabError("generate: give at least one prompt (\"a prompt --d 1\") or --prompts FILE")
    loras = [parse_lora_arg(t) for t in args.lora]
    paths = generate(args.model, prompts, args.out, loras=loras, device=args.device, precision=args.precision,
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


def cmd_attention(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.review.attention import attention
    from loralab.review.generate import parse_lora_arg
    from loralab.train.sampling import parse_prompt_line

    prompt = parse_prompt_line(args.prompt, where="prompt")
    words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words else []
    result = attention(args.model, prompt, args.out, words=words, loras=[parse_lora_arg(t) for t in args.lora],
                       device=args.device, precision=args.precision, seed=args.seed, sampler=args.sampler,
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
    a.add_argument("--words", default="", help="comma-separated words or tags to map (default: each tag of the prompt)")
    a.add_argument("--out", default="attention", help="output folder (default: attention)")
    a.add_argument("--seed", type=int, default=0, help="seed when the prompt has no --d (default 0)")
    a.add_argument("--sampler", default="", help="sampler (default ddim; euler_a for SDXL)")
    a.add_argument("--clip-skip", type=int, default=0, help="as in training (2 for NAI-style anime models)")
    a.add_argument("--max-token-length", type=int, default=75, choices=(75, 150, 225), help="as in training")
    a.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="UNet compute dtype")
    a.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    a.set_defaults(func=cmd_attention)


def cmd_review(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

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
    from pathlib import Path

    from loralab.lab.model import lab_model_path
    from loralab.review.runlog import read_run

    model = opts.model or read_run(folder, opts.name).config.get("pretrained_model_name_or_path") or ""
    if not model or not Path(model).exists() or Path(model).resolve() != lab_model_path().resolve():
        return None
    from loralab.lab.judge import lab_judge

    return lab_judge(folder, opts.name, device=opts.device or "cpu")


def cmd_config_import(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.config.convert import read_kohya_config, to_toml
    from loralab.io import atomic_write_bytes

    imported = read_kohya_config(args.file)
    text = to_toml(imported)
    if args.out:
        out = Path(args.out)
        if out.exists():
            raise LoralabError(f"config import: {out} exists; choose another --out or remove it")
        atomic_write_bytes(out, text.encode("utf-8"))
        print(imported.report())
        print(f"wrote {out}" + (" (fix the keys under 'not imported' before training)" if imported.problems else ""))
    else:
        print(text, end="")
        print(imported.report(), file=sys.stderr)
    if imported.prompt_text:
        print("the config's sample prompts are text, not a file: save them in a file and set sample_prompts to it:\n"
              + imported.prompt_text, file=sys.stderr)
    return 2 if imported.problems else 0


def _add_config_parser(sub) -> None:
    c = sub.add_parser("config", help="kohya configs: import a sd-scripts TOML or kohya_ss GUI JSON")
    csub = c.add_subparsers(dest="config_command", required=True)
    i = csub.add_parser("import", help="write the loralab TOML of a kohya config and say what was mapped or dropped")
    i.add_argument("file", help="sd-scripts TOML or kohya_ss GUI JSON")
    i.add_argument("--out", help="the loralab TOML to write (default: print it)")
    i.set_defaults(func=cmd_config_import)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loralab", description="LoRA trainer and troubleshooting lab for Stable Diffusion")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", add_help=False,
                       help="train a LoRA from a kohya config (sd-scripts TOML or kohya_ss GUI JSON)")
    t.add_argument("--config", "--config_file", dest="config", help="TOML config with kohya argument names")
    t.add_argument("-h", "--help", action="store_true")
    t.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="check the config and the dataset, print what the run would do, load nothing")
    t.set_defaults(func=cmd_train)
    d = sub.add_parser("demo", help="teach the lab model a new shape: dataset, reg images, training, grids, report")
    d.add_argument("--out", default="loralab_demo", help="output folder (default: loralab_demo)")
    d.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    d.add_argument("--quick", action="store_true", help="a much smaller run (about a minute)")
    d.set_defaults(func=cmd_demo)
    _add_generate_parser(sub)
    _add_attention_parser(sub)
    _add_review_parser(sub)
    _add_config_parser(sub)
    _add_analysis_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(lambda: args.func(args, extra), debug=args.debug)


def run_command(command, debug: bool = False) -> int:
    """Run a command: a user error (or a full disk met outside our own writers, e.g. appending to the
    log) is one line on stderr and exit code 2, Ctrl-C exit code 130; `--debug` shows the traceback."""
    from loralab.io import DISK_FULL_ERRNOS

    try:
        return command()
    except LoralabError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug or e.errno not in DISK_FULL_ERRNOS:
            raise
        print(f"error: disk full: could not write {e.filename or 'a file'} ({e.strerror}). The files written before "
              "are intact; free some space and run again (with resume = the last state folder to continue).",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
