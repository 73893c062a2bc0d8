"""The job queue of `loralab ui`: jobs kept in SQLite (`<workdir>/ui.sqlite3`), one worker that runs them one
at a time per device (`startable`), each in its own process.

A job is a `loralab` command line (`train --config <workdir>/jobs/<id>/config.toml`, `review <run>`, `demo`).
The worker starts `python -m loralab.ui.runjob <job folder> -- <args>` in a new session: that process runs
the command, writes its output to `jobs/<id>/job.log` and its exit code to `jobs/<id>/rc.json`. So a crash
or an out-of-memory in training never takes the app down, and an app that stops (or restarts) leaves the
training running: the next app finds the process by its pid and waits for it (`Worker.tick`).

Cancel sends SIGINT: the trainer finishes its step and writes `<output_name>-interrupted-state`
(train/callbacks.py `StopOnSignal`), which `resume` continues.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,             -- train, review, demo
    name TEXT NOT NULL,
    args TEXT NOT NULL,             -- JSON list: the loralab command line
    output_dir TEXT NOT NULL,       -- where the command writes (the run folder): its files are served
    status TEXT NOT NULL,           -- new (being added), queued, running, done, failed, cancelled
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    pid INTEGER,
    rc INTEGER,
    error TEXT NOT NULL DEFAULT '',
    cancel INTEGER NOT NULL DEFAULT 0,
    parent INTEGER,                 -- the train job a review or resume job belongs to
    device TEXT NOT NULL DEFAULT '' -- as asked ('' = the default); once started, the device it runs on
);
CREATE TABLE IF NOT EXISTS dataset_roots (  -- the folders the dataset page checked: their images are served
    n INTEGER PRIMARY KEY,          -- 0, 1, ...: the <n> of /datasets/<n>/<path>
    path TEXT NOT NULL UNIQUE
);
"""
ACTIVE = ("queued", "running")


@dataclass
class Job:
    id: int
    kind: str
    name: str
    args: list[str]
    output_dir: str
    status: str
    created: float
    started: float | None
    finished: float | None
    pid: int | None
    rc: int | None
    error: str
    cancel: int
    parent: int | None
    device: str = ""

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["args"] = json.loads(d["args"])
        return cls(**d)


class JobStore:
    """The jobs table; every call opens its own connection (the worker thread and the web handlers share it)."""

    def __init__(self, workdir: str | Path) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / "ui.sqlite3"
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            if "device" not in {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}:  # a queue of an older app
                db.execute("ALTER TABLE jobs ADD COLUMN device TEXT NOT NULL DEFAULT ''")

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def job_dir(self, job_id: int) -> Path:
        return self.workdir / "jobs" / str(job_id)

    def add(self, kind: str, name: str, args: list[str], output_dir: str | Path, parent: int | None = None,
            files: dict[str, str] | None = None) -> Job:
        """Queue a job. `files` ({name: text}) are written into its folder first; "{job_dir}" in `args` is
        replaced by that folder. Its device is the one its command asks for (`requested_device`)."""
        with self._db() as db:
            cur = db.execute("INSERT INTO jobs (kind, name, args, output_dir, status, created, parent) "
                             "VALUES (?, ?, '[]', ?, 'new', ?, ?)", (kind, name, str(output_dir), time.time(), parent))
            job_id = int(cur.lastrowid)
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, text in (files or {}).items():
            (folder / file_name).write_text(text, encoding="utf-8")
        args = [a.replace("{job_dir}", str(folder)) for a in args]
        output_dir = str(output_dir).replace("{job_dir}", str(folder))
        self.update(job_id, args=json.dumps(args), output_dir=output_dir, device=requested_device(kind, args),
                    status="queued")  # only now, complete, does the worker see it
        return self.get(job_id)

    def get(self, job_id: int) -> Job | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def all(self) -> list[Job]:
        with self._db() as db:
            return [Job.from_row(r) for r in db.execute("SELECT * FROM jobs ORDER BY id")]

    def with_status(self, status: str) -> list[Job]:
        with self._db() as db:
            return [Job.from_row(r) for r in db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY id", (status,))]

    def update(self, job_id: int, **values) -> None:
        cols = ", ".join(f"{k} = ?" for k in values)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*values.values(), job_id))

    def claim(self, job_id: int, **values) -> bool:
        """Mark a queued job running (with `values`), unless it left the queue meanwhile (a cancel): whether it
        did."""
        cols = "".join(f", {k} = ?" for k in values)
        with self._db() as db:
            cur = db.execute(f"UPDATE jobs SET status = 'running'{cols} WHERE id = ? AND status = 'queued'",
                             (*values.values(), job_id))
            return cur.rowcount == 1

    def request_cancel(self, job_id: int) -> None:
        """A queued job is cancelled at once; a running one gets SIGINT from the worker (its state is saved)."""
        with self._db() as db:
            db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, error = 'cancelled before it started' "
                       "WHERE id = ? AND status = 'queued'", (time.time(), job_id))
            db.execute("UPDATE jobs SET cancel = 1 WHERE id = ? AND status = 'running'", (job_id,))

    def output_dirs(self) -> list[Path]:
        return [Path(j.output_dir) for j in self.all() if j.output_dir]

    def add_dataset_root(self, folder: str | Path) -> int:
        """Remember a dataset folder (resolved) whose images the app may serve; its number."""
        path = str(Path(folder).resolve())
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO dataset_roots (n, path) "
                       "VALUES ((SELECT COALESCE(MAX(n) + 1, 0) FROM dataset_roots), ?)", (path,))
            return int(db.execute("SELECT n FROM dataset_roots WHERE path = ?", (path,)).fetchone()["n"])

    def dataset_roots(self) -> list[Path]:
        """The dataset folders, the n-th at index n."""
        with self._db() as db:
            return [Path(r["path"]) for r in db.execute("SELECT path FROM dataset_roots ORDER BY n")]


def requested_device(kind: str, args: list[str]) -> str:
    """The device a job's command asks for: its `--device`, else a training's config key `device`, else the
    command's default ("cpu" for `demo`, "" for the others: cuda if available, else cpu)."""
    for i, a in enumerate(args[:-1]):
        if a == "--device":
            return args[i + 1]
    if kind == "train" and "--config" in args[:-1]:
        from loralab.config.convert import read_kohya_config
        from loralab.errors import LoralabError

        try:
            return str(read_kohya_config(args[args.index("--config") + 1]).values.get("device") or "")
        except LoralabError:  # the job itself will say what is wrong with its config
            return ""
    return "cpu" if kind == "demo" else ""


def device_slot(device: str, default: str) -> str:
    """The device a job occupies, as `loralab train` resolves it (train/run.py `pick_device`): "" or "auto" is
    `default`; "cuda" is cuda:0 (torch's current device); every cpu job shares "cpu"."""
    name = device.strip().lower()
    name = name if name not in ("", "auto") else default
    kind, _, index = name.partition(":")
    return "cpu" if kind == "cpu" else f"{kind}:{index or 0}"


def startable(queued: list[Job], running: list[Job], default: str) -> list[Job]:
    """The queued jobs to start now: one job at a time per device, each device's jobs in queue order (a job for
    a free device does not wait behind one for a busy device)."""
    busy = {device_slot(j.device, default) for j in running}
    out = []
    for job in queued:
        slot = device_slot(job.device, default)
        if slot not in busy:
            busy.add(slot)
            out.append(job)
    return out


def read_rc(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "rc.json").read_text())["rc"])
    except (OSError, ValueError, KeyError):
        return None


def process_alive(pid: int | None, folder: Path) -> bool:
    """Whether `pid` is still the runner of the job in `folder` (pids are reused: on Linux its command line
    must name the folder)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return str(folder) in text and ") Z " not in stat  # a zombie has finished
    return True


def error_line(log_path: Path) -> str:
    """The message a failed command left: the CLI's `error: ...` line, else a traceback's last line, else
    the last line of the log."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")[-20000:]
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln
    if any(ln.startswith("Traceback") for ln in lines):
        return lines[-1]
    return lines[-1] if lines else ""


class Worker:
    """Runs the queued jobs, one at a time per device (`startable`), from a thread of the app (`start`) or by
    `tick()`. `default_device` is where a job that names none runs (default: as `loralab train` picks it)."""

    def __init__(self, store: JobStore, interval: float = 0.5, default_device: str = "") -> None:
        self.store = store
        self.interval = interval
        self._default = default_device
        self.children: dict[int, subprocess.Popen] = {}  # runners this app started (reaped here)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loralab-ui-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the worker must outlive any one job's trouble
                log.exception("job worker")
            self._stop.wait(self.interval)

    @property
    def default_device(self) -> str:
        if not self._default:
            # imports torch: once, when the first job is queued
            from loralab.train.run import pick_device

            self._default = str(pick_device(""))
        return self._default

    def tick(self) -> None:
        for job in self.store.with_status("running"):
            self._watch(job)
        queued = self.store.with_status("queued")
        if queued:
            for job in startable(queued, self.store.with_status("running"), self.default_device):
                self._launch(job)

    def _watch(self, job: Job) -> None:
        folder = self.store.job_dir(job.id)
        child = self.children.get(job.id)
        if child is not None:
            child.poll()
        rc = read_rc(folder)
        if rc is None and process_alive(job.pid, folder):
            if job.cancel == 1:
                os.kill(job.pid, signal.SIGINT)
                self.store.update(job.id, cancel=2)
            return
        self.children.pop(job.id, None)
        if rc == 0:
            status, error = "done", ""
        elif rc == 130 or job.cancel:
            status, error = "cancelled", "cancelled" + (": a resumable state was saved" if resume_state(job) else "")
        else:
            status = "failed"
            error = error_line(folder / "job.log") if rc is not None else "the job's process ended without an exit code"
        self.store.update(job.id, status=status, rc=rc, error=error, finished=time.time())

    def _launch(self, job: Job) -> None:
        """Start a queued job; one cancelled since the queue was read is not started (its row is claimed first;
        a cancel after that reaches the process through `_watch`)."""
        if not self.store.claim(job.id, started=time.time(), device=device_slot(job.device, self.default_device)):
            return
        folder = self.store.job_dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "loralab.ui.runjob", str(folder), "--", *job.args]
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True, cwd=str(self.store.workdir))
        self.children[job.id] = child
        self.store.update(job.id, pid=child.pid)


def resume_state(job: Job) -> Path | None:
    """The `<output_name>-interrupted-state` folder a cancelled training left, if any."""
    if job.kind != "train":
        return None
    states = sorted(Path(job.output_dir).glob("*-interrupted-state"), key=lambda p: p.stat().st_mtime)
    return states[-1] if states else None
