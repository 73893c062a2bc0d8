"""`loralab ui [--host 127.0.0.1] [--port 7860] [--workdir DIR]`: the parser and the command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loralab.errors import LoralabError

NETWORK_WARNING = ("warning: loralab ui listens on {host}: anyone on the network can start jobs and read files of "
                   "its folders (there is no login). Use the default 127.0.0.1 unless you mean that.")


def cmd_ui(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LoralabError("loralab ui needs its web packages: pip install 'loralab[ui]'") from None
    from loralab.ui.app import is_loopback, serve

    workdir = Path(args.workdir).expanduser().resolve()
    if not is_loopback(args.host):
        print(NETWORK_WARNING.format(host=args.host), file=sys.stderr, flush=True)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"loralab ui: http://{shown}:{args.port}/  (working folder {workdir}; Ctrl-C stops the app, not the "
          f"running training)", flush=True)
    serve(workdir, host=args.host, port=args.port)
    return 0


def _add_ui_parser(sub) -> None:
    u = sub.add_parser("ui", help="the local web app: config form, job queue, live progress, samples and reviews")
    u.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other shows a warning)")
    u.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    u.add_argument("--workdir", default="loralab_ui",
                   help="folder of the job queue, job logs and saved configs (default: loralab_ui)")
    u.set_defaults(func=cmd_ui)
