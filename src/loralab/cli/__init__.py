"""`loralab` command line: one entry point, each command a thin function that parses and calls the library
(`dataset.py`: the dataset tools; `judging.py`: the commands that draw with a LoRA).

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


TRAIN_USAGE = """usage: loralab train --config run.toml [--key value ...] [--dry-run]

Train a LoRA. The TOML keys are kohya-ss sd-scripts argument names; any key can also be given on the
command line (command line > TOML > default). Unknown keys and bad values are rejected before any model loads.
--dry-run checks the config and the dataset and prints every key with its source, the dataset's images,
repeats, buckets and steps, and the model family, without loading weights or writing anything.

keys (default, meaning):"""


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
    from loralab.train.guide import guide_warnings

    for warning in guide_warnings(cfg):  # the guide's warnings, before the model loads (and in a dry run)
        log.warning(warning)
    if args.dry_run:
        from loralab.train.dry_run import dry_run

        from loralab.recipes import dry_run_data

        print(dry_run(cfg, sources, dry_run_data(cfg)))
        return 0
    from loralab.recipes import train_any

    result = train_any(cfg)
    return 130 if result.interrupted else 0


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

    from loralab.lab.demo import run_demo

    report = run_demo(Path(args.out), device=args.device, quick=args.quick)
    print(f"report: {report}")
    return 0


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
    from loralab.cli.dataset import _add_analysis_parsers
    from loralab.cli.judging import (
        _add_attention_parser,
        _add_bleed_parser,
        _add_generate_parser,
        _add_probe_parser,
        _add_reg_images_parser,
        _add_review_parser,
    )

    _add_generate_parser(sub)
    _add_reg_images_parser(sub)
    _add_attention_parser(sub)
    _add_bleed_parser(sub)
    _add_probe_parser(sub)
    _add_review_parser(sub)
    from loralab.cli.doctor import _add_doctor_parser

    _add_doctor_parser(sub)
    _add_config_parser(sub)
    _add_analysis_parsers(sub)
    from loralab.ui.cli import _add_ui_parser

    _add_ui_parser(sub)
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
