"""The process the ui's worker starts for one job: `python -m loralab.ui.runjob <job folder> -- <loralab args>`.

It runs `python -m loralab.cli <args>` with its output in `<job folder>/job.log`, passes SIGINT/SIGTERM on
(the trainer then saves a resumable state), and writes the exit code to `<job folder>/rc.json` last, so an
app started later knows how the job ended even when it did not start it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from loralab.io import atomic_write_bytes


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print("usage: python -m loralab.ui.runjob JOB_FOLDER -- LORALAB_ARGS...", file=sys.stderr)
        return 2
    folder, args = Path(argv[0]), argv[2:]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(folder / "job.log", "ab") as out:
        out.write(("$ loralab " + " ".join(args) + "\n").encode())
        out.flush()
        child = subprocess.Popen([sys.executable, "-m", "loralab.cli", *args], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, env=env)

        def forward(signum, frame):
            child.send_signal(signum)

        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        rc = child.wait()
    atomic_write_bytes(folder / "rc.json", json.dumps({"rc": rc}).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
