"""Screenshots of `loralab ui` for the README: a lab-model training queued through the form, watched, reviewed,
diagnosed.

    OMP_NUM_THREADS=1 python tools/ui_screenshots.py [--out docs] [--keep DIR]

Starts `loralab ui` on a free port of 127.0.0.1 in a temporary folder, drives Debian's headless chromium
(Selenium, /usr/bin/chromium + /usr/bin/chromedriver, as tests/test_ui.py) and writes docs/ui_config.png
(the form after Check, with the diff against the defaults), docs/ui_config_errors.png (bad values with the
CLI's messages), docs/ui_dataset.png (the problems `dataset check` found, with thumbnails of their images; dataset
check, tags, tokens), docs/ui_job.png (loss and learning-rate charts, samples per epoch), docs/ui_jobs.png (the
queue) and docs/ui_results.png (the doctor's findings, then the review). The lab dataset has a planted
grayscale image, and the copy the dataset page checks also two captions without the activation tag.
About 7 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def finished(driver, job_id: int) -> bool:
    job = driver.execute_script(f"return fetch('/api/jobs/{job_id}').then(r => r.json())")
    if job["status"] in ("failed", "cancelled"):
        raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
    return job["status"] == "done"


def shoot(driver, path: Path, height: int | None = None) -> None:
    full = height or driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, min(max(full, 700), 2400))
    time.sleep(0.8)
    driver.save_screenshot(str(path))
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs", help="folder of the PNGs (default docs)")
    p.add_argument("--keep", default="", help="work in this folder and keep it (default: a temporary one)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.keep or tempfile.mkdtemp(prefix="loralab_ui_shots_")).resolve()
    root.mkdir(parents=True, exist_ok=True)

    from loralab.lab import demo as D
    from loralab.lab import world as W
    from loralab.ui.forms import to_toml

    W.write_kohya_dataset(root / "data", tag=D.TAG, n=10, repeats=2, seed=3)  # root/data/2_olis/
    data = root / "data"
    captions = sorted(data.rglob("*.txt"))[:3]
    prompts = root / "prompts.txt"
    prompts.write_text("".join(f"{c.read_text().strip()} --w 32 --h 32 --d {i} --s 20\n" for i, c in enumerate(captions)))
    recipe = D.DemoRecipe(max_train_epochs=4, unet_lr=3e-3, train_batch_size=4, seed=3, extra={"validation_split": 0.2})
    cfg = D.train_config(recipe, data, None, root / "runs", "cpu")
    cfg.sample_prompts, cfg.sample_every_n_epochs, cfg.output_name = str(prompts), 1, "olis"
    (root / "olis.toml").write_text(to_toml(cfg))
    gray = sorted((data / f"2_{D.TAG}").glob("*.png"))[6]  # a planted problem the training keeps
    Image.open(gray).convert("L").save(gray)
    checked = root / "data_check"  # and a copy with two captions that lack the tag, for the dataset page
    shutil.copytree(data, checked)  # (a run trained on it would have no trigger word for review's lab judge)
    for caption in sorted((checked / f"2_{D.TAG}").glob("*.txt"))[3:5]:
        caption.write_text(caption.read_text().replace(f"{D.TAG}, ", "", 1))

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log = open(root / "app.log", "w")
    app = subprocess.Popen([sys.executable, "-m", "loralab.cli", "ui", "--port", str(port), "--workdir",
                            str(root / "work")], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
              "--hide-scrollbars"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
    try:
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 30, "the app")
        driver.get(url + "/config")  # bad values first: the CLI's messages next to the fields
        for key, value in (("network_dim", "0"), ("train_data_dir", str(root / "no_such_folder"))):
            el = driver.find_element(By.ID, f"f-{key}")
            el.clear()
            el.send_keys(value)
        driver.find_element(By.ID, "do-check").click()
        driver.set_window_size(1280, 900)
        driver.execute_script("document.getElementById('f-train_data_dir').scrollIntoView({block: 'center'})")
        time.sleep(0.5)
        driver.save_screenshot(str(out / "ui_config_errors.png"))
        print(f"wrote {out / 'ui_config_errors.png'}")

        driver.get(url + "/config")  # load the lab run's TOML, check it, queue it
        driver.find_element(By.ID, "load_path").send_keys(str(root / "olis.toml"))
        driver.find_element(By.ID, "do-load").click()
        driver.find_element(By.ID, "do-check").click()
        driver.set_window_size(1280, 900)
        time.sleep(0.5)
        driver.save_screenshot(str(out / "ui_config.png"))
        print(f"wrote {out / 'ui_config.png'}")
        el = driver.find_element(By.ID, "f-train_data_dir")  # the dataset reports of the planted copy
        el.clear()
        el.send_keys(str(checked))
        driver.find_element(By.ID, "do-dataset").click()
        wait_for(lambda: driver.find_elements(By.ID, "report-3"), 120, "the dataset reports")
        thumbs = driver.find_elements(By.CSS_SELECTOR, "img.thumb")
        wait_for(lambda: thumbs and all(driver.execute_script("return arguments[0].naturalWidth", t) for t in thumbs),
                 20, "the thumbnails")
        shoot(driver, out / "ui_dataset.png", height=1500)
        driver.set_window_size(1280, 900)
        driver.get(url + f"/config?load={root / 'olis.toml'}")
        driver.find_element(By.ID, "do-queue").click()
        wait_for(lambda: driver.current_url.endswith("/jobs/1"), 20, "the job page")
        driver.get(url + "/config?job=1")  # rerun with edits: a second run at rank 4 waits in the queue
        for key, value in (("output_name", "olis_dim4"), ("network_dim", "4"), ("network_alpha", "4")):
            el = driver.find_element(By.ID, f"f-{key}")
            el.clear()
            el.send_keys(value)
        driver.find_element(By.ID, "do-queue").click()
        wait_for(lambda: driver.current_url.endswith("/jobs/2"), 20, "the second job")
        wait_for(lambda: finished(driver, 1), 600, "the training")
        driver.get(url + "/jobs/1")
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#samples img.sample"), 30, "the samples")
        time.sleep(2)
        shoot(driver, out / "ui_job.png", height=1900)
        driver.set_window_size(1280, 900)
        driver.find_element(By.ID, "do-review").click()
        wait_for(lambda: driver.current_url.endswith("/jobs/3"), 20, "the review job")
        driver.get(url + "/")  # job 2 running, the review queued
        shoot(driver, out / "ui_jobs.png", height=600)
        wait_for(lambda: finished(driver, 3), 900, "the review")
        driver.get(url + "/jobs/1/results")  # the doctor (quick: --no-images), then its findings above the review
        driver.find_element(By.ID, "doctor-no-images").click()
        driver.find_element(By.ID, "do-doctor").click()
        wait_for(lambda: driver.current_url.endswith("/jobs/4"), 20, "the doctor job")
        wait_for(lambda: finished(driver, 4), 300, "the doctor")
        driver.get(url + "/jobs/1/results")
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#findings > li.finding"), 20, "the findings")
        shoot(driver, out / "ui_results.png", height=1800)
    finally:
        driver.quit()
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=20)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
