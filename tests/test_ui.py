"""`loralab ui` driven in a real headless Chromium (Debian's chromium + chromedriver, through Selenium): the
form queues two tiny trainings, the first one's loss curve and samples appear, the app restarts mid-queue
and finds the queue intact, the second job runs, the first one's review opens and `generate` draws with its
first epoch at weight 0.5, and the Doctor button's `loralab doctor --no-images` shows its ranked findings there;
bad input shows the CLI's message next to its field; the dataset reports, and the problems of
`dataset check` with thumbnails of their images (a planted grayscale image, a caption without its tag); a
failing training shows its error and the app keeps running; cancel leaves a resumable state; the app
listens on 127.0.0.1 only and serves no file outside its folders."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from test_train import make_dataset

CHROMIUM = os.environ.get("LORALAB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LORALAB_CHROMEDRIVER", "/usr/bin/chromedriver")
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """`loralab ui` in its own process, as a user starts it."""

    def __init__(self, workdir: Path, cwd: Path, port: int | None = None) -> None:
        self.workdir, self.cwd, self.port = workdir, cwd, port or free_port()
        self.out = cwd / f"app-{self.port}.out"
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "loralab.cli", "ui", "--port", str(self.port),
                                          "--workdir", str(workdir)], cwd=cwd, env=ENV, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    self.banner = self.out.read_text().splitlines()[0]
                    return
            except OSError:
                assert self.proc.poll() is None, self.out.read_text()
                time.sleep(0.1)
        raise AssertionError("the app did not listen")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", path)  # sent as written: no client-side normalisation of ../
        r = conn.getresponse()
        return r.status, r.read()

    def job(self, job_id: int) -> dict:
        status, body = self.get(f"/api/jobs/{job_id}")
        assert status == 200, body
        return json.loads(body)

    def wait_job(self, job_id: int, until, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            assert info["status"] not in ("failed",) or until(info), info["error"] + info["log"][-2000:]
            time.sleep(0.3)
        raise AssertionError(f"job {job_id}: {info['status']}\n{info['log'][-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_sd1_checkpoint):
    """A tiny dataset (2 images of 64 px, 2 repeats, batch 2: 2 steps an epoch) and a prompt file."""
    root = tmp_path_factory.mktemp("ui")
    img, _ = make_dataset(root, concepts=(("2_alpha", 2),), reg=False)
    (root / "prompts.txt").write_text("alpha, red --w 64 --h 64 --d 5 --s 2\n")
    return {"root": root, "ckpt": tiny_sd1_checkpoint, "img": img, "prompts": root / "prompts.txt"}


def wait(browser, condition, timeout: float = 60, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; page:\n{browser.find_element(By.TAG_NAME, 'body').text[-3000:]}")


def fill(browser, values: dict[str, str]) -> None:
    for key, value in values.items():
        el = browser.find_element(By.ID, f"f-{key}")
        el.clear()
        el.send_keys(str(value))


def fill_id(browser, values: dict[str, str]) -> None:
    for element_id, value in values.items():
        el = browser.find_element(By.ID, element_id)
        el.clear()
        el.send_keys(value)


def tiny_run(lab, out: Path, name: str, epochs: int = 2) -> dict[str, str]:
    return {"pretrained_model_name_or_path": str(lab["ckpt"]), "train_data_dir": str(lab["img"]),
            "output_dir": str(out), "output_name": name, "resolution": "64", "max_train_epochs": str(epochs),
            "save_every_n_epochs": "1", "sample_prompts": str(lab["prompts"]), "sample_every_n_epochs": "1",
            "network_dim": "4", "network_alpha": "2", "learning_rate": "1e-3", "device": "cpu", "seed": "1",
            "train_batch_size": "2"}


def make_planted(root: Path) -> Path:
    """A concept folder with two problems `dataset check` finds: a grayscale image whose caption does not say
    so, and a caption without the activation tag; and two clean images."""
    rng = np.random.default_rng(1)
    concept = root / "2_alpha"
    concept.mkdir(parents=True)
    for name, caption in (("ok0", "alpha, red"), ("ok1", "alpha, blue"), ("untagged", "red, blue background")):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(concept / f"{name}.png")
        (concept / f"{name}.txt").write_text(caption)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).convert("L").save(concept / "gray.png")
    (concept / "gray.txt").write_text("alpha, green")
    return root


def field_error(browser, key: str) -> str:
    found = browser.find_elements(By.ID, f"err-{key}")
    return found[0].text if found else ""


def test_queue_two_trainings_watch_restart_and_review(browser, lab, tmp_path):
    work, out = tmp_path / "work", tmp_path / "runs"
    app = App(work, tmp_path)
    try:
        assert app.banner.startswith(f"loralab ui: http://127.0.0.1:{app.port}/")
        browser.get(app.url + "/config")
        fill(browser, tiny_run(lab, out, "first"))
        browser.find_element(By.ID, "do-check").click()
        assert "The config is valid" in browser.find_element(By.ID, "check-ok").text
        diff = browser.find_element(By.ID, "diff").text
        assert "output_name last first" in diff and "max_train_epochs 0 2" in diff
        browser.find_element(By.ID, "do-queue").click()
        wait(browser, lambda: browser.current_url.endswith("/jobs/1"), 10, "job 1's page")

        browser.get(app.url + "/config?job=1")  # rerun with edits: the first job's config in the form
        assert browser.find_element(By.ID, "f-output_name").get_attribute("value") == "first"
        assert browser.find_element(By.ID, "f-max_train_epochs").get_attribute("value") == "2"
        fill(browser, {"output_name": "second"})
        browser.find_element(By.ID, "do-queue").click()
        wait(browser, lambda: browser.current_url.endswith("/jobs/2"), 10, "job 2's page")
        assert app.job(2)["status"] == "queued"

        browser.get(app.url + "/jobs/1")  # the loss curve and the samples appear as the run goes
        wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#loss-chart .uplot canvas"), 300, "the loss chart")
        wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#samples img.sample"), 300, "a sample image")
        img = browser.find_element(By.CSS_SELECTOR, "#samples img.sample")
        wait(browser, lambda: browser.execute_script("return arguments[0].naturalWidth", img) == 64, 10, "the image")
        assert "epoch 1" in browser.find_element(By.ID, "samples").text
        info = app.job(1)
        from loralab.train.logs import read_train_log

        steps = [r for r in read_train_log(out) if r["kind"] == "step"]
        assert info["chart"]["loss"][0] == [r["step"] for r in steps][: len(info["chart"]["loss"][0])]
        assert len(info["chart"]["loss"][0]) >= 1 and info["chart"]["lr_names"]

        app.stop()  # restart mid-queue: the training goes on without the app; job 2 still waits
        assert app.proc.returncode is not None
        app = App(work, tmp_path)
        browser.get(app.url + "/")
        rows = browser.find_element(By.ID, "jobs").text
        assert "first" in rows and "second" in rows
        assert browser.find_element(By.ID, "job-row-1").find_element(By.CLASS_NAME, "device").text == "cpu"
        assert browser.find_element(By.ID, "job-row-2").find_element(By.CLASS_NAME, "status").text in ("queued", "running",
                                                                                                        "done")
        one = app.wait_job(1, lambda i: i["status"] == "done", 300)
        two = app.wait_job(2, lambda i: i["status"] == "done", 300)
        assert (out / "first.safetensors").is_file() and (out / "second.safetensors").is_file()
        assert [g["label"] for g in one["samples"]] == ["epoch 1", "epoch 2"]
        assert [g["label"] for g in two["samples"]] == ["epoch 1", "epoch 2"]
        assert one["bar"]["total"] == 4 and one["step"] == 4

        browser.get(app.url + "/jobs/1")  # review the first run, then open its results
        wait(browser, lambda: browser.find_element(By.ID, "do-review").is_displayed(), 10, "the review button")
        weights = browser.find_element(By.ID, "review-weights")
        weights.clear()
        weights.send_keys("0,1")
        browser.find_element(By.ID, "do-review").click()
        wait(browser, lambda: browser.current_url.endswith("/jobs/3"), 10, "the review job")
        app.wait_job(3, lambda i: i["status"] == "done", 400)
        browser.get(app.url + "/jobs/1/results")
        review = json.loads((out / "review" / "review.json").read_text())
        assert browser.find_element(By.ID, "recommended").text.startswith(
            f"recommended epoch: {review['recommended_epoch']}")
        images = browser.find_elements(By.CSS_SELECTOR, "img.review-image")
        assert {"review/grid.png", "review/loss.png"} <= {i.get_attribute("alt") for i in images}
        assert all(browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
        assert "## Recommended epoch" in browser.find_element(By.ID, "report").text

        options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#gen-lora option")]
        assert options == ["first-000001.safetensors", "first.safetensors"]  # an epoch file, then the final one
        browser.find_element(By.CSS_SELECTOR, "#gen-lora option[value='first-000001.safetensors']").click()
        fill_id(browser, {"gen-weight": "0.5", "gen-prompt": "alpha, red --w 64 --h 64 --d 7 --s 2"})
        browser.find_element(By.ID, "do-generate").click()  # `loralab generate` with that epoch and weight
        wait(browser, lambda: browser.current_url.endswith("/jobs/4"), 10, "the generate job")
        info = app.wait_job(4, lambda i: i["status"] == "done", 300)
        assert len(info["images"]) == 1 and "--lora" in info["log"] and "first-000001.safetensors:0.5" in info["log"]
        img = wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#images img.generated"), 20, "the image")[0]
        wait(browser, lambda: browser.execute_script("return arguments[0].naturalWidth", img) == 64, 10, "its pixels")

        browser.get(app.url + "/jobs/1/results")  # the doctor, quick (--no-images), then its findings there
        assert not browser.find_elements(By.ID, "findings")
        browser.find_element(By.ID, "doctor-no-images").click()
        browser.find_element(By.ID, "do-doctor").click()
        wait(browser, lambda: browser.current_url.endswith("/jobs/5"), 10, "the doctor job")
        info = app.wait_job(5, lambda i: i["status"] == "done", 300)
        assert "doctor " + str(out) in info["log"] and "--no-images" in info["log"]
        diagnosis = json.loads((out / "doctor" / "doctor.json").read_text())
        assert diagnosis["findings"] and (out / "doctor" / "doctor.md").is_file()
        wait(browser, lambda: browser.find_element(By.ID, "results-link").is_displayed(), 10, "the results link")
        browser.find_element(By.ID, "results-link").click()  # a doctor job's results: its run's page
        wait(browser, lambda: browser.current_url.endswith("/jobs/1/results"), 10, "the results page")
        findings = browser.find_elements(By.CSS_SELECTOR, "#findings > li.finding")
        assert [f.find_element(By.CLASS_NAME, "finding-title").text for f in findings] == \
            [f["title"] for f in diagnosis["findings"]]  # ranked as doctor.json ranks them
        first = diagnosis["findings"][0]
        assert findings[0].find_element(By.CLASS_NAME, "fix").text == f"fix: {first['fix']}"
        assert [m.text for m in findings[0].find_elements(By.CSS_SELECTOR, ".measured li")] == first["measured"]
        assert browser.find_element(By.ID, "doctor-answer").text == diagnosis["answer"]
    finally:
        app.stop()


def test_bad_input_shows_the_cli_message_next_to_the_field(browser, lab, tmp_path):
    app = App(tmp_path / "work", tmp_path)
    try:
        browser.get(app.url + "/config")
        bad = {"pretrained_model_name_or_path": str(lab["ckpt"]), "train_data_dir": str(tmp_path / "nowhere"),
               "network_dim": "0", "caption_dropout_rate": "1.5", "max_train_epochs": "two"}
        fill(browser, bad)
        browser.find_element(By.ID, "do-check").click()
        shown = {k: field_error(browser, k) for k in ("train_data_dir", "network_dim", "caption_dropout_rate",
                                                       "max_train_epochs")}
        assert shown["network_dim"] == "network_dim: must be at least 1, got 0"
        assert shown["train_data_dir"] == f"train_data_dir: {tmp_path / 'nowhere'} does not exist"
        assert shown["caption_dropout_rate"] == "caption_dropout_rate: must be in [0, 1), got 1.5"
        assert shown["max_train_epochs"].startswith("max_train_epochs: bad value 'two'")  # no "(form)" next to it
        assert not browser.find_elements(By.ID, "check-ok")
        cli = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--dry-run"]
                             + [a for k, v in bad.items() if k != "max_train_epochs" for a in (f"--{k}", v)],
                             capture_output=True, text=True, env=ENV, timeout=120)
        assert cli.returncode == 2
        for key in ("train_data_dir", "network_dim", "caption_dropout_rate"):
            assert shown[key] in cli.stderr, (shown[key], cli.stderr)
        cli = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--dry-run", "--max_train_epochs", "two"],
                             capture_output=True, text=True, env=ENV, timeout=120)  # the CLI says where it came from
        assert shown["max_train_epochs"].replace(":", " (command line):", 1) in cli.stderr, cli.stderr
        assert browser.find_element(By.ID, "f-network_dim").get_attribute("value") == "0"  # what was typed stays

        config = tmp_path / "kohya.toml"  # an imported file with an unknown key
        config.write_text('[training]\nmax_train_epochs = 3\nnetwrk_dim = 8\n')
        browser.find_element(By.ID, "load_path").send_keys(str(config))
        browser.find_element(By.ID, "do-load").click()
        message = field_error(browser, "load_path")
        cli = subprocess.run([sys.executable, "-m", "loralab.cli", "config", "import", str(config)],
                             capture_output=True, text=True, env=ENV, timeout=120)
        assert "netwrk_dim: unknown key" in message and "network_dim" in message
        assert message in cli.stderr
        assert browser.find_element(By.ID, "f-max_train_epochs").get_attribute("value") == "3"
        load = browser.find_element(By.ID, "load_path")
        load.clear()
        load.send_keys(str(tmp_path / "missing.json"))
        browser.find_element(By.ID, "do-load").click()
        assert field_error(browser, "load_path") == f"config import: {tmp_path / 'missing.json'} does not exist"

        good = tiny_run(lab, tmp_path / "runs", "kept")  # save a TOML, load it back
        browser.get(app.url + "/config")
        fill(browser, good)
        browser.find_element(By.ID, "save_name").send_keys("kept")
        browser.find_element(By.ID, "do-save").click()
        saved = tmp_path / "work" / "configs" / "kept.toml"
        assert browser.find_element(By.ID, "saved").text == f"saved {saved}"
        from loralab.config import build_config

        cfg = build_config(saved)
        assert cfg.output_name == "kept" and cfg.network_dim == 4 and cfg.max_train_epochs == 2
        browser.get(app.url + f"/config?load={saved}")
        assert browser.find_element(By.ID, "f-output_name").get_attribute("value") == "kept"

        browser.find_element(By.ID, "do-dataset").click()  # the dataset reports of the loaded config's folder
        reports = [browser.find_element(By.ID, f"report-{i}").text for i in (1, 2, 3)]
        assert "steps per epoch: 2 (batch size 2, 4 train + 0 reg samples)" in reports[0]  # 2 images x 2 repeats
        assert "--resolution 64" in reports[0] and "--no-bucket" in reports[0]
        assert "tag0" in reports[1] and "alpha" in reports[2] and "share no token" in reports[2]
        problem = browser.find_element(By.ID, "problem-1")  # --no-bucket: the 64x96 image loses a third
        assert len(browser.find_elements(By.CSS_SELECTOR, ".problem")) == 1 and "warning: heavy_crop" in problem.text
        assert problem.find_element(By.CSS_SELECTOR, "img.thumb").get_attribute("src") == \
            f"{app.url}/datasets/0/2_alpha/alpha1.png"

        planted = make_planted(tmp_path / "planted")  # problems with thumbnails of their images
        browser.get(app.url + f"/config?load={saved}")
        fill(browser, {"train_data_dir": str(planted)})
        browser.find_element(By.ID, "do-dataset").click()
        problems = {p.find_element(By.TAG_NAME, "b").text: p for p in browser.find_elements(By.CSS_SELECTOR, ".problem")}
        assert set(problems) == {"warning: grayscale", "warning: activation_missing"}, list(problems)
        for code, image in (("warning: grayscale", "gray.png"), ("warning: activation_missing", "untagged.png")):
            thumb = problems[code].find_element(By.CSS_SELECTOR, "img.thumb")
            assert thumb.get_attribute("src") == f"{app.url}/datasets/1/2_alpha/{image}"  # root 0: the first check
            wait(browser, lambda: browser.execute_script("return arguments[0].naturalWidth", thumb) == 64, 10, image)
            assert app.get(f"/datasets/1/2_alpha/{image}") == (200, (planted / "2_alpha" / image).read_bytes())
        assert "untagged.txt" in problems["warning: activation_missing"].text
        assert "activation tag 'alpha' of 2_alpha is missing" in problems["warning: activation_missing"].text
        (tmp_path / "secret.txt").write_text("outside")
        for path in ("/datasets/1/../../secret.txt", "/datasets/1/%2e%2e/%2e%2e/secret.txt", "/datasets/2/x.png",
                     "/datasets/1/2_alpha/../../secret.txt", f"/datasets/1/{tmp_path / 'secret.txt'}"):
            status, body = app.get(path)
            assert status == 404 and b"outside" not in body, path

        app.stop()  # the checked folders are kept in the queue's database: after a restart, the same thumbnails
        app = App(tmp_path / "work", tmp_path)
        assert app.get("/datasets/1/2_alpha/gray.png") == (200, (planted / "2_alpha" / "gray.png").read_bytes())
        assert app.get("/datasets/0/2_alpha/alpha1.png") == (200, (lab["img"] / "2_alpha" / "alpha1.png").read_bytes())
        for path in ("/datasets/1/../../secret.txt", "/datasets/1/%2e%2e/%2e%2e/secret.txt", "/datasets/2/x.png",
                     f"/datasets/1/{tmp_path / 'secret.txt'}"):
            status, body = app.get(path)
            assert status == 404 and b"outside" not in body, path
    finally:
        app.stop()


def test_a_failing_training_shows_its_error_cancel_keeps_a_state_and_the_app_runs_on(browser, lab, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all" * 10)
    app = App(tmp_path / "work", tmp_path)
    try:
        browser.get(app.url + "/config")
        fill(browser, {**tiny_run(lab, tmp_path / "bad", "bad"), "pretrained_model_name_or_path": str(junk)})
        browser.find_element(By.ID, "do-queue").click()
        wait(browser, lambda: browser.current_url.endswith("/jobs/1"), 10, "job 1")
        info = app.wait_job(1, lambda i: i["status"] in ("failed", "done"), 300)
        assert info["status"] == "failed" and info["error"].startswith("error: ")
        assert "Traceback" not in info["log"]
        error = wait(browser, lambda: browser.find_element(By.ID, "error").is_displayed()
                     and browser.find_element(By.ID, "error").text, 10, "the error")
        assert error == info["error"] and error in info["log"]
        assert app.proc.poll() is None and app.get("/")[0] == 200

        browser.get(app.url + "/config")  # a longer run, cancelled once it has stepped: a resumable state
        fill(browser, tiny_run(lab, tmp_path / "long", "long", epochs=40))
        browser.find_element(By.ID, "do-queue").click()
        wait(browser, lambda: browser.current_url.endswith("/jobs/2"), 10, "job 2")
        app.wait_job(2, lambda i: i["step"] >= 2, 300)
        browser.find_element(By.ID, "do-cancel").click()
        info = app.wait_job(2, lambda i: i["status"] == "cancelled", 300)
        state = tmp_path / "long" / "long-interrupted-state"
        assert state.is_dir() and info["resume_state"] == str(state) and 2 <= info["step"] < 80
        assert not (tmp_path / "long" / "long.safetensors").exists()
        browser.get(app.url + "/jobs/2")
        wait(browser, lambda: browser.find_element(By.ID, "do-resume").is_displayed(), 10, "the resume button")
        browser.find_element(By.ID, "do-resume").click()
        wait(browser, lambda: browser.current_url.endswith("/jobs/3"), 10, "job 3")
        resumed = app.job(3)
        assert resumed["status"] in ("queued", "running") and resumed["name"] == "long"
        assert f"--resume {state}" in browser.find_element(By.ID, "job").text  # test_interrupt: resume is exact
        browser.find_element(By.ID, "do-cancel").click()  # a cancel while it waits or starts up ends it
        assert app.wait_job(3, lambda i: i["status"] == "cancelled", 300)["error"].startswith("cancelled")
        assert app.proc.poll() is None and app.get("/")[0] == 200
    finally:
        app.stop()


def test_one_job_at_a_time_per_device(tmp_path):
    """The worker's rule on real queue rows: a job runs on the device its command asks for (a training's config
    key `device`, another command's --device, else the default), one job at a time per device."""
    from loralab.ui.jobs import JobStore, Worker, startable

    store = JobStore(tmp_path / "work")
    asks = [("train", [], '[model]\ndevice = "cuda"\n'), ("review", [], ""), ("generate", ["--device", "cuda:1"], ""),
            ("doctor", ["--device", "cuda:0"], ""), ("demo", [], ""), ("generate", ["--device", "cpu"], "")]
    for kind, args, config in asks:
        store.add(kind, kind, [kind, "--config", "{job_dir}/config.toml"] * (kind == "train") + args, tmp_path,
                  files={"config.toml": config} if config else None)
    assert [j.device for j in store.all()] == ["cuda", "", "cuda:1", "cuda:0", "cpu", "cpu"]
    queued = store.with_status("queued")
    assert [j.id for j in startable(queued, [], "cpu")] == [1, 2, 3]  # cuda:0, cpu (the default), cuda:1
    assert [j.id for j in startable(queued, [], "cuda")] == [1, 3, 5]  # the default is cuda:0: job 2 waits for 1
    store.update(1, status="running", device="cuda:0")
    assert [j.id for j in startable(store.with_status("queued"), store.with_status("running"), "cpu")] == [2, 3]
    stale = store.with_status("queued")  # the worker read the queue; then job 6 is cancelled before it starts
    store.request_cancel(6)
    assert 6 in [j.id for j in stale] and not store.claim(6)
    assert (store.get(6).status, store.get(6).error) == ("cancelled", "cancelled before it started")

    work = JobStore(tmp_path / "real")  # real jobs: `doctor --help` on cuda:0 and cuda:1 side by side, then cuda
    for device in ("cuda:0", "cuda:1", "cuda"):
        work.add("doctor", device, ["doctor", "--help", "--device", device], tmp_path)
    Worker(work, default_device="cpu").tick()
    assert [(j.status, j.device) for j in work.all()] == [("running", "cuda:0"), ("running", "cuda:1"), ("queued", "cuda")]
    worker = Worker(work, default_device="cpu")  # a restarted app: the rows are all it knows
    deadline = time.time() + 120
    while time.time() < deadline and work.get(3).status != "done":
        worker.tick()
        time.sleep(0.2)
    one, two, three = work.all()
    assert [j.status for j in (one, two, three)] == ["done"] * 3 and three.device == "cuda:0"
    assert three.started >= one.finished and two.started < one.finished  # after job 1's device was free
    assert "usage: loralab doctor" in (work.job_dir(3) / "job.log").read_text()


def test_listens_on_loopback_only_and_serves_no_file_outside(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "secret.txt").write_text("outside")
    (work / "inside.txt").write_text("inside")
    (work / "link.txt").symlink_to(tmp_path / "secret.txt")
    app = App(work, tmp_path)
    try:
        hexport = f"{app.port:04X}"
        listening = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if local.endswith(":" + hexport) and state == "0A":  # 0A: LISTEN
                    listening.append(local)
        assert listening == ["0100007F:" + hexport]  # 127.0.0.1 only, no IPv6, no 0.0.0.0
        assert app.get("/files/inside.txt") == (200, b"inside")
        for path in ("/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/..%2fsecret.txt",
                     "/files/link.txt", f"/files/{tmp_path / 'secret.txt'}", "/files//etc/passwd",
                     "/files/../../../../etc/passwd", "/jobs/1/files/../secret.txt", "/static/../app.py",
                     "/static/%2e%2e/app.py"):
            status, body = app.get(path)
            assert status == 404 and b"outside" not in body and b"root:" not in body, path
        second = subprocess.run([sys.executable, "-m", "loralab.cli", "ui", "--port", str(free_port()), "--workdir",
                                 str(work)], capture_output=True, text=True, env=ENV, timeout=60)
        assert second.returncode == 2 and f"error: another loralab ui serves {work}" in second.stderr
    finally:
        app.stop()
    # another address is the user's choice, with a warning (192.0.2.1, a documentation address, is not on this
    # machine: the bind fails after the warning, and nothing is sent anywhere)
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "ui", "--host", "192.0.2.1", "--port", str(free_port()),
                        "--workdir", str(work)], capture_output=True, text=True, env=ENV, timeout=60)
    assert "warning: loralab ui listens on 192.0.2.1: anyone on the network can start jobs and read files" in r.stderr
    assert r.returncode != 0
