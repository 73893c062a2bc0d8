"""`loralab ui`: a Starlette app with server-rendered pages (Jinja2) and one small script per page.

Pages: `/` the jobs (queue, status, the demo button), `/config` the training form (check, save and load
TOML, import a kohya config, queue), `/jobs/<id>` a job (progress, loss and learning-rate charts, samples
per epoch, its output, cancel / resume / rerun with edits / review), `/jobs/<id>/results` a run's review and
its `loralab doctor` findings (the Doctor button queues it), `/config` → dataset: the CLI's dataset reports and
the problems of `dataset check` with thumbnails of their images.
Every page is built from what is on disk (the SQLite queue, the run folders), so a reload or a restart of
the app loses nothing. Files are served only from the working folder, the jobs' output folders and the
dataset folders checked on the dataset page (kept in the queue's database; `/datasets/<n>/<path>`).
`create_app` assembles one group of routes per page (`home_routes`, `config_routes`, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from loralab.errors import LoralabError
from loralab.io import atomic_write_bytes
from loralab.ui import forms
from loralab.ui.dataset import JSON_TITLE, dataset_reports, shown_problems
from loralab.ui.jobs import Job, JobStore, Worker, resume_state
from loralab.ui.progress import doctor_facts, job_progress, log_tail, review_facts

HERE = Path(__file__).parent
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def safe_file(root: Path, rel: str) -> Path | None:
    """`root/rel` when it is a file inside `root` (no `..`, no link leading out), else None."""
    if not rel or ".." in Path(rel).parts or Path(rel).is_absolute() or "\\" in rel:
        return None
    root = root.resolve()
    try:
        path = (root / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return path if path.is_file() and path.is_relative_to(root) else None


def clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def took(job) -> str:
    if not job.started:
        return ""
    s = (job.finished or time.time()) - job.started
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def epoch_files(job) -> list[Path]:
    """The LoRA files a training job saved: `<name>-NNNNNN.safetensors` per epoch, then the final file."""
    if job.kind != "train":
        return []
    out = Path(job.output_dir)
    epochs = sorted(p for p in out.glob(f"{job.name}-*.safetensors") if re.fullmatch(r"\d{6}", p.stem[len(job.name) + 1:]))
    final = out / f"{job.name}.safetensors"
    return epochs + ([final] if final.is_file() else [])


@dataclass
class Site:
    """What every page handler needs: the queue (and its folders) and the templates."""

    store: JobStore
    templates: Jinja2Templates

    def page(self, request: Request, name: str, **context) -> Response:
        return self.templates.TemplateResponse(request, name, {"workdir": self.store.workdir, **context})

    def job(self, request: Request) -> Job:
        job = self.store.get(int(request.path_params["job_id"]))
        if job is None:
            raise HTTPException(404, "no such job")
        return job

    def queue(self, kind: str, name: str, args: list[str], output_dir: str | Path, **kw) -> Response:
        job = self.store.add(kind, name, args, output_dir, **kw)
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)


def create_app(workdir: str | Path, *, worker: bool = True) -> Starlette:
    """The app over `workdir` (the queue database, job folders, saved configs); `worker=False` serves the
    pages without running any job."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["clock"] = clock
    templates.env.filters["took"] = took
    site = Site(JobStore(workdir), templates)
    runner = Worker(site.store)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return PlainTextResponse(str(exc.detail), status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if worker:
            runner.start()
        yield
        runner.stop()

    routes = [*home_routes(site), *config_routes(site), *job_routes(site), *result_routes(site), *file_routes(site),
              Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found})
    app.state.store = site.store
    app.state.worker = runner
    return app


def home_routes(site: Site) -> list[Route]:
    """`/`: the jobs, with a link to each finished one's results; `/demo`: queue `loralab demo --quick`."""
    store = site.store

    async def home(request: Request) -> Response:
        jobs = store.all()
        results = {}  # job -> its results page: a finished demo, a reviewed training and its review job
        for j in jobs:
            if j.status == "done" and j.kind == "demo":
                results[j.id] = f"/jobs/{j.id}/results"
            elif j.status == "done" and j.kind == "doctor" and j.parent:
                results[j.id] = f"/jobs/{j.parent}/results"
            elif j.status == "done" and (Path(j.output_dir) / "review" / "review.json").is_file():
                results[j.id] = f"/jobs/{j.parent if j.kind == 'review' and j.parent else j.id}/results"
        return site.page(request, "jobs.html", jobs=jobs[::-1], results=results,
                         running=[j for j in jobs if j.status in ("running", "queued")])

    async def demo(request: Request) -> Response:
        n = len([j for j in store.all() if j.kind == "demo"]) + 1
        out = store.workdir / f"demo-{n}"
        return site.queue("demo", f"demo {n}", ["demo", "--out", str(out), "--quick"], out)

    return [Route("/", home), Route("/demo", demo, methods=["POST"])]


def config_routes(site: Site) -> list[Route]:
    """`/config`: the training form (a job's config to rerun with edits, or a file to load); its actions:
    load, check, save, queue, and the dataset page of its folders."""
    store = site.store

    def config_page(request: Request, state: forms.FormState, **extra) -> Response:
        return site.page(request, "config.html", state=state, groups=forms.groups(), **extra)

    async def config_get(request: Request) -> Response:
        job_id = request.query_params.get("job")
        load = request.query_params.get("load")
        if job_id and (job := store.get(int(job_id))) and (store.job_dir(job.id) / "config.toml").is_file():
            state = forms.load_file(str(store.job_dir(job.id) / "config.toml"))
            state.notes = [f"the config of job {job.id} ({job.name}): edit it and queue it again"]
        elif load:
            state = forms.load_file(load)
        else:
            state = forms.FormState(values=forms.defaults())
        return config_page(request, state, load_path=load or "")

    async def dataset_page(request: Request, values: dict[str, str], load_path: str) -> Response:
        folder = values.get("train_data_dir", "")
        if not folder or not Path(folder).is_dir():
            state = forms.FormState(values=values)
            state.errors["train_data_dir"] = [f"train_data_dir: {folder} does not exist" if folder else
                                              "train_data_dir: missing; give the folder that holds "
                                              "<repeats>_<name>/ image folders"]
            return config_page(request, state, load_path=load_path)
        reports = await asyncio.to_thread(dataset_reports, values)
        for f in (folder, values.get("reg_data_dir", "")):
            if f and Path(f).is_dir():
                store.add_dataset_root(f)
        shown = [r for r in reports if r.title != JSON_TITLE]
        problems = shown_problems(next((r for r in reports if r.title == JSON_TITLE), None), store.dataset_roots())
        return site.page(request, "dataset.html", folder=folder, reports=shown, problems=problems)

    async def config_post(request: Request) -> Response:
        form = dict(await request.form())
        action = form.get("action", "check")
        load_path = str(form.get("load_path", "")).strip()
        if action == "load":
            return config_page(request, forms.load_file(load_path), load_path=load_path)
        if action == "dataset":
            return await dataset_page(request, forms.from_form(form), load_path)
        state = forms.check(forms.from_form(form))
        saved = ""
        if state.cfg is not None and action == "save":
            name = str(form.get("save_name", "")).strip() or state.cfg.output_name
            if not SAFE_NAME.match(name):
                state.errors["save_name"] = [f"save_name: {name!r}: use letters, digits, '.', '_' and '-'"]
            else:
                path = store.workdir / "configs" / (name if name.endswith(".toml") else f"{name}.toml")
                atomic_write_bytes(path, forms.to_toml(state.cfg).encode("utf-8"))
                saved = str(path)
        if state.cfg is not None and action == "queue":
            cfg = forms.absolute(state.cfg)
            return site.queue("train", cfg.output_name, ["train", "--config", "{job_dir}/config.toml"], cfg.output_dir,
                              files={"config.toml": forms.to_toml(cfg, "queued by loralab ui")})
        return config_page(request, state, load_path=load_path, saved=saved, checked=action == "check")

    return [Route("/config", config_get, methods=["GET"]), Route("/config", config_post, methods=["POST"])]


def job_routes(site: Site) -> list[Route]:
    """`/jobs/<id>`: a job's page, its progress (`/api/jobs/<id>`) and log; cancel, resume, review, doctor."""
    store = site.store

    async def job_page(request: Request) -> Response:
        job = site.job(request)
        config = store.job_dir(job.id) / "config.toml"
        return site.page(request, "job.html", job=job, config=config.read_text() if config.is_file() else "",
                         parent=store.get(job.parent) if job.parent else None)

    async def job_api(request: Request) -> Response:
        job = site.job(request)
        return JSONResponse(job_progress(job, store.job_dir(job.id)))

    async def job_log(request: Request) -> Response:
        job = site.job(request)
        return PlainTextResponse(log_tail(store.job_dir(job.id) / "job.log", 200_000))

    async def job_cancel(request: Request) -> Response:
        job = site.job(request)
        store.request_cancel(job.id)
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)

    async def job_resume(request: Request) -> Response:
        job = site.job(request)
        state = resume_state(job)
        if job.kind != "train" or state is None:
            raise HTTPException(404, "this job left no state to resume")
        text = (store.job_dir(job.id) / "config.toml").read_text()
        return site.queue("train", job.name, ["train", "--config", "{job_dir}/config.toml", "--resume", str(state)],
                          job.output_dir, parent=job.id, files={"config.toml": text})

    async def job_review(request: Request) -> Response:
        job = site.job(request)
        if job.kind != "train":
            raise HTTPException(404, "only a training run has a review")
        form = await request.form()
        weights = re.sub(r"[^0-9.,]", "", str(form.get("weights", "")) or "0,0.5,1,1.5,2")
        prompts = str(form.get("max_prompts", "8")).strip()
        args = ["review", job.output_dir, "--name", job.name, "--weights", weights,
                "--max-prompts", prompts if prompts.isdigit() else "8"]
        return site.queue("review", job.name, args, job.output_dir, parent=job.id)

    async def job_doctor(request: Request) -> Response:
        job = site.job(request)
        if job.kind != "train" or job.status != "done":
            raise HTTPException(404, "only a finished training run has a doctor")
        form = await request.form()
        args = ["doctor", job.output_dir, "--name", job.name] + (["--no-images"] if form.get("no_images") else [])
        return site.queue("doctor", job.name, args, job.output_dir, parent=job.id)

    return [Route("/jobs/{job_id:int}", job_page),
            Route("/api/jobs/{job_id:int}", job_api),
            Route("/jobs/{job_id:int}/log", job_log),
            Route("/jobs/{job_id:int}/cancel", job_cancel, methods=["POST"]),
            Route("/jobs/{job_id:int}/resume", job_resume, methods=["POST"]),
            Route("/jobs/{job_id:int}/review", job_review, methods=["POST"]),
            Route("/jobs/{job_id:int}/doctor", job_doctor, methods=["POST"])]


def result_routes(site: Site) -> list[Route]:
    """`/jobs/<id>/results`: a run's review and doctor findings (a demo's report); `generate` with an epoch."""
    store = site.store

    async def job_results(request: Request) -> Response:
        job = site.job(request)
        if job.kind == "doctor" and job.parent:  # a doctor job's findings are on its run's page
            return RedirectResponse(f"/jobs/{job.parent}/results", status_code=303)
        out = Path(job.output_dir)
        if job.kind == "demo":
            report = out / "report.md"
            facts = {"data": {}, "images": sorted(p.name for p in out.glob("*.png")),
                     "markdown": report.read_text(encoding="utf-8") if report.is_file() else ""}
        else:
            facts = review_facts(out)
        loras = [p.name for p in epoch_files(job)]
        best = (facts or {}).get("data", {}).get("recommended_epoch")
        chosen = f"{job.name}-{best:06d}.safetensors" if isinstance(best, int) else ""
        if best and chosen not in loras and loras:
            chosen = loras[-1]  # the last epoch is the final file (kohya writes no numbered one for it)
        doctors = [j for j in store.all() if j.kind == "doctor" and j.parent == job.id]
        return site.page(request, "results.html", job=job, facts=facts, loras=loras, chosen=chosen,
                         doctor=doctor_facts(out) if job.kind == "train" else None,
                         doctor_job=doctors[-1] if doctors else None)

    async def job_generate(request: Request) -> Response:
        job = site.job(request)
        files = {p.name: p for p in epoch_files(job)}
        form = await request.form()
        lora = files.get(str(form.get("lora", "")))
        config = store.job_dir(job.id) / "config.toml"
        if lora is None or not config.is_file():
            raise HTTPException(404, "no such LoRA file of this run")
        cfg = forms.load_file(str(config)).values
        weight = re.sub(r"[^0-9.+-]", "", str(form.get("weight", "1"))) or "1"
        prompt = str(form.get("prompt", "")).strip() or f"{job.name} --d 1"
        out = Path(job.output_dir) / "ui_generate" / f"{lora.stem}_w{weight}_{int(time.time())}"
        args = ["generate", prompt, "--model", cfg["pretrained_model_name_or_path"], "--lora", f"{lora}:{weight}",
                "--out", str(out), "--clip-skip", cfg["clip_skip"], "--max-token-length", cfg["max_token_length"]]
        args += ["--device", cfg["device"]] if cfg.get("device") else []
        return site.queue("generate", f"{lora.stem} at {weight}", args, out, parent=job.id)

    return [Route("/jobs/{job_id:int}/results", job_results),
            Route("/jobs/{job_id:int}/generate", job_generate, methods=["POST"])]


def file_routes(site: Site) -> list[Route]:
    """The files the pages show: a job's output folder, the working folder, the checked dataset folders (kept
    in the queue's database, so a restart of the app still serves their thumbnails). Anything else: 404."""

    def serve_under(root: Path | None, rel: str) -> Response:
        path = safe_file(root, rel) if root is not None else None
        if path is None:
            raise HTTPException(404, "not found")
        return FileResponse(path)

    async def job_file(request: Request) -> Response:
        return serve_under(Path(site.job(request).output_dir), request.path_params["path"])

    async def work_file(request: Request) -> Response:
        return serve_under(site.store.workdir, request.path_params["path"])

    async def dataset_file(request: Request) -> Response:
        n, roots = request.path_params["root"], site.store.dataset_roots()
        return serve_under(roots[n] if n < len(roots) else None, request.path_params["path"])

    return [Route("/jobs/{job_id:int}/files/{path:path}", job_file),
            Route("/files/{path:path}", work_file),
            Route("/datasets/{root:int}/{path:path}", dataset_file)]


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def serve(workdir: str | Path, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run the app until Ctrl-C (uvicorn). The jobs it started keep running; the next app adopts them."""
    import uvicorn

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with one_app(Path(workdir)):
        app = create_app(workdir)
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()


@contextlib.contextmanager
def one_app(workdir: Path):
    """One app per working folder: a second one would run the same queue twice (an exclusive lock on
    `WORKDIR/ui.lock`, released when the app's process ends)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "ui.lock", "a+") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LoralabError(f"another loralab ui serves {workdir}; stop it first or choose another --workdir") from None
        yield
