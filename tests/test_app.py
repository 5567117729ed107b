"""The browser editor end to end: `python edit.py --serve` driven by headless Chromium.

Needs the app extra (gradio), selenium and a Chromium with its driver (Debian: chromium, chromium-driver); `.ci/run`
installs them, so in CI this runs. The page's screenshot is saved to $X2X_TEST_ARTIFACTS (default: the test's
tmp folder). With X2X_REQUIRE_BROWSER_TEST=1 (as in CI) a missing piece is an error instead of a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from x2x_jax.data.instructions import Edit, parse
from x2x_jax.data.io import load_source
from x2x_jax.editing import api
from x2x_jax.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
DRIVER = shutil.which("chromedriver")
try:
    import gradio  # noqa: F401
    import selenium  # noqa: F401
    missing = None if BROWSER and DRIVER else "no Chromium / chromedriver on PATH (Debian: chromium chromium-driver)"
except ImportError as e:
    missing = f"the app extra or selenium is not installed ({e.name}): pip install -e '.[app]' selenium"

if missing and os.environ.get("X2X_REQUIRE_BROWSER_TEST"):  # .ci/run sets it: there the test must run
    raise RuntimeError(f"the browser editor test cannot run: {missing}")
needs_browser = pytest.mark.skipif(missing is not None, reason=str(missing))


@pytest.mark.parametrize("choices, edit", [
    (("add", "pleural effusion", "moderate", "left", "", ""),
     Edit("add", ("pleural effusion",), severity="moderate", location="left")),
    (("remove", "edema", "", "", "", ""), Edit("remove", ("edema",))),
    (("change", "cardiomegaly", "", "", "mild", "severe"),
     Edit("change", ("cardiomegaly",), level_from="mild", level_to="severe")),
])
def test_composer_writes_sentences_of_the_grammar(choices, edit):
    from x2x_jax.cli.app import compose

    sentence = compose(*choices)
    assert sentence.endswith(".")
    assert parse(sentence).edits == (edit,)


def test_composer_refuses_an_incomplete_change():
    from x2x_jax.cli.app import compose

    with pytest.raises(ConfigError, match="cannot compose that sentence"):
        compose("change", "edema", "", "", "mild", "")


def test_serve_refuses_cli_inputs_and_a_missing_app_extra(capsys, monkeypatch):
    from x2x_jax.cli.edit import main

    with pytest.raises(SystemExit) as e:
        main(["--serve", "--image", str(api.DEFAULT_EXAMPLE)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --serve takes its images and instructions in the browser, "
                                               "not from --image, --requests or --instruction")
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(SystemExit) as e:
        main(["--serve"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --serve needs the app extra: pip install -e '.[app]'"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def comparable(record: dict) -> dict:
    """edit.json without what differs between two runs of the same edit (the input's path, timings, backend)."""
    return {k: v for k, v in record.items() if k not in ("image", "timings", "backend")}


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "edit.py"), "--serve", "--port", str(port), "--steps",
                             str(STEPS)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while not answers(url):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the editor did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1300"):
        options.add_argument(arg)
    options.binary_location = BROWSER
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.implicitly_wait(30)  # the page renders its components after load
    yield driver
    driver.quit()


@pytest.mark.slow
@needs_browser
def test_browser_edit_matches_the_cli_and_sliders_do_not_recompile(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    example = str(api.DEFAULT_EXAMPLE)
    instruction = "Add the finding of pleural effusion."
    # The CLI's edit of the same inputs, in parallel with the browser session.
    cli = subprocess.Popen([sys.executable, str(ROOT / "edit.py"), "--image", example, "--instruction", instruction,
                            "--steps", str(STEPS), "--out", str(tmp_path / "cli")],
                           env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)

    def find(css):
        return browser.find_element(By.CSS_SELECTOR, css)

    def run_and_wait(timeout=240):
        before = find("#status").text
        find("#run").click()
        seen, deadline = set(), time.time() + timeout
        while time.time() < deadline:
            page = browser.find_element(By.TAG_NAME, "body").text
            seen |= {p for p in ("Compiling the edit program", f"/{STEPS} steps") if p in page}
            status = find("#status").text
            if status != before and (status.startswith("Done") or status.startswith("error")):
                return status, seen
            time.sleep(0.2)
        pytest.fail(f"no result within {timeout} s; status {find('#status').text!r}")

    def download(name):
        hrefs = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")]
        links = {h.rsplit("/", 1)[-1]: h for h in hrefs if h}
        assert name in links, f"{name} not among the downloads {sorted(links)}"
        with urllib.request.urlopen(links[name], timeout=30) as r:
            return r.read()

    browser.get(server)
    find("#upload input[type=file]").send_keys(example)
    box = find("#instruction textarea")
    box.clear()
    box.send_keys(instruction)
    status, seen = run_and_wait()
    assert status.startswith("Done"), status
    assert "Compiling the edit program" in seen, "no compile message shown during the first edit"
    assert f"/{STEPS} steps" in seen, "no step progress shown"
    for elem in ("#edited-image", "#overlay-image", "#mask-image", "#difference-image"):
        img = find(f"{elem} img")
        loaded = "return arguments[0].complete && arguments[0].naturalWidth"
        deadline = time.monotonic() + 30  # "Done" can show before the browser has finished loading the image
        while not browser.execute_script(loaded, img) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert browser.execute_script(loaded, img) > 0, elem
    assert find("#compiles").text.strip().endswith("1")
    record = json.loads(download("edit.json"))
    edited_png = download("edited.png")

    assert cli.wait(240) == 0, cli.stdout.read()
    cli_record = json.loads((tmp_path / "cli" / "edit.json").read_text())
    assert comparable(record) == comparable(cli_record)
    (tmp_path / "browser_edited.png").write_bytes(edited_png)
    np.testing.assert_array_equal(load_source(tmp_path / "browser_edited.png").pixels,
                                  load_source(tmp_path / "cli" / "edited.png").pixels)
    assert record["timings"]["compile_s"] > 0

    # tau is a traced argument: a new value re-runs the compiled program.
    tau = find("#tau input[type=number]")
    tau.send_keys(Keys.CONTROL, "a")
    tau.send_keys("0.3", Keys.TAB)
    time.sleep(0.5)
    status, _ = run_and_wait()
    assert status.startswith("Done"), status
    record = json.loads(download("edit.json"))
    assert record["parameters"]["tau"] == pytest.approx(0.3)
    assert record["timings"]["compile_s"] == 0.0
    assert find("#compiles").text.strip().endswith("1"), "moving tau recompiled the program"
    artifacts = Path(os.environ.get("X2X_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(artifacts / "editor.png"))

    # A truncated PNG: the CLI's one-line error in the page, and the server keeps answering.
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(example).read_bytes()[:300])
    with pytest.raises(DataError) as cli_error:
        load_source(truncated)
    browser.get(server)
    find("#upload input[type=file]").send_keys(str(truncated))
    status, _ = run_and_wait()
    problem = str(cli_error.value).split(": ", 1)[1]  # after the path, which is the upload's copy on the server
    assert status.startswith("error: ") and status.endswith(problem), status
    assert answers(server)
    find("#use-example").click()  # and it still edits
    time.sleep(1)
    status, _ = run_and_wait()
    assert status.startswith("Done"), status
