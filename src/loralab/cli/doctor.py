"""`loralab doctor OUTPUT_DIR`: the problems of a run, most important first (review/doctor.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_doctor(args: argparse.Namespace, extra: list[str]) -> int:
    from tqdm.auto import tqdm

    from loralab.cli.judging import _is_lab_model, _lab_shape_reader
    from loralab.review.doctor import DoctorOptions, doctor
    from loralab.errors import LoralabError
    from loralab.review.runlog import read_run

    opts = DoctorOptions(folder=args.folder, model=args.model, config=args.config, dataset=args.dataset,
                         name=args.name, out=args.out, images=not args.no_images, device=args.device, seeds=args.seeds)
    model = args.model
    if not model:
        try:  # the doctor says what it could not read; here only the lab judge is at stake
            model = str(read_run(Path(args.folder), args.name).config.get("pretrained_model_name_or_path") or "")
        except LoralabError:
            model = ""
    judge = reader = None
    if opts.images and _is_lab_model(model):
        from loralab.lab.judge import lab_judge

        reader = _lab_shape_reader(model, args.device)
        if not args.no_lab_scores:
            try:  # the evaluator's scores in the review: only for a run whose captions share a trigger word
                judge = lab_judge(Path(args.folder), args.name, device=args.device or "cpu")
            except LoralabError:
                judge = None
    bar = tqdm(desc="doctor", unit="check", dynamic_ncols=True)

    def progress(text: str) -> None:
        bar.set_postfix_str(text)
        bar.update(1)

    try:
        d = doctor(opts, judge=judge, shape_reader=reader, progress=progress)
    finally:
        bar.close()
    print(d.answer)
    for i, f in enumerate(d.findings[:5], 1):
        print(f"{i}. {f.title}\n   fix: {f.fix}")
    if d.unchecked:
        print("could not check: " + "; ".join(d.unchecked))
    print(f"report: {d.report}")
    return 0


def _add_doctor_parser(sub) -> None:
    d = sub.add_parser("doctor", help="what is wrong with a training run, most important first, with the guide's fixes",
                       description="Reads OUTPUT_DIR (its log and config, its dataset, its epoch files), runs dataset "
                                   "check, tokens, review, probe and bleed on it and writes OUTPUT_DIR/doctor/doctor.md: "
                                   "the problems found, most important first, each with its measurement and fix.")
    d.add_argument("folder", metavar="OUTPUT_DIR", help="the run's output_dir")
    d.add_argument("--model", default="", help="base model (default: the one the run logged)")
    d.add_argument("--config", default="", help="the run's TOML config, when its log has none")
    d.add_argument("--dataset", default="", help="train_data_dir (default: the config's)")
    d.add_argument("--name", default="", help="output_name, when the folder holds several runs")
    d.add_argument("--out", default="", help="output folder (default: OUTPUT_DIR/doctor)")
    d.add_argument("--no-images", action="store_true",
                   help="skip the checks that draw images (review, probe, bleed): the epoch comes from the losses")
    d.add_argument("--no-lab-scores", action="store_true",
                   help="on a lab-model run: leave the lab evaluator's scores out of the review (faster)")
    d.add_argument("--seeds", type=int, default=4, help="seeds per prompt for bleed (probe uses twice as many)")
    d.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    d.set_defaults(func=cmd_doctor)
