"""`loralab` command line: one entry point, each command a thin function that parses and calls the library.

User errors (`LoralabError`) are printed as one message without a traceback; `--debug` shows it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from loralab.errors import LoralabError

log = logging.getLogger("loralab")


def _parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--key value` pairs after the known options; a `--flag` with no value means true."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise LoralabError(f"command line: expected --key value, got {tok!r}")
        key = tok[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            out[key] = value
            i += 1
            continue
        values: list[str] = []
        i += 1
        while i < len(tokens) and not (tokens[i].startswith("--") and len(tokens[i]) > 2 and not _is_number(tokens[i])):
            values.append(tokens[i])
            i += 1
        if not values:
            out[key] = "true"
        elif len(values) == 1:
            out[key] = values[0]
        else:
            out[key] = values
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from loralab.config import build_config, config_help

    if args.help:
        print(TRAIN_USAGE)
        print(config_help())
        return 0
    overrides = _parse_overrides(extra)
    cfg = build_config(args.config, overrides)
    from loralab.train.loop import train

    train(cfg)
    return 0


TRAIN_USAGE = """usage: loralab train --config run.toml [--key value ...]

Train a LoRA. The TOML keys are kohya-ss sd-scripts argument names; any key can also be given on the
command line (command line > TOML > default). Unknown keys and bad values are rejected before any model loads.

keys (default, meaning):"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loralab", description="LoRA trainer and troubleshooting lab for Stable Diffusion")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", add_help=False, help="train a LoRA from a kohya-style TOML config")
    t.add_argument("--config", help="TOML config with kohya argument names")
    t.add_argument("-h", "--help", action="store_true")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except LoralabError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
