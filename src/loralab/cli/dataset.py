"""`loralab dataset ...`, `loralab tokens`, `loralab vae-check`: the dataset tools' commands (no model, or the VAE only)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loralab.errors import LoralabError


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
        add_embeddings,
        dataset_tokens,
        render_dataset_tokens,
        render_text_tokens,
        text_tokens,
    )

    if (args.dataset or args.dataset_config) and args.text:
        raise LoralabError("tokens: give either TEXT or --dataset DIR (or --dataset-config FILE), not both")
    if args.dataset_config or args.dataset:
        if args.dataset_config:
            from loralab.analyze.scan import scan_dataset_config

            result = dataset_tokens(None, dataset=scan_dataset_config(args.dataset_config, args.caption_extension))
        else:
            result = dataset_tokens(args.dataset, caption_extension=args.caption_extension)
        if args.model:
            add_embeddings(result, args.model)
        print(result.to_json() if args.json else render_dataset_tokens(result))
        return 0
    if not args.text:
        raise LoralabError('tokens: give tags, e.g. loralab tokens "jinxdef, blue hair", or --dataset DIR')
    text_result = text_tokens(args.text)
    if args.model:
        add_embeddings(text_result, args.model)
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
    k.add_argument("--model", metavar="M", help="base model: also measure each token's text-encoder embedding "
                                                "(norm z-score: known or not; nearest common words)")
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

