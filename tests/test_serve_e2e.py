"""End to end: ``embedsearch serve`` on a free localhost port, driven in headless Chromium.

Uses Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/install-browser``) through
Selenium with explicit paths, so nothing is downloaded at run time. Skips, saying why, when
they are absent. Set ``EMBEDSEARCH_E2E_SCREENSHOTS=DIR`` to keep the page screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import draw_image, make_collection

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

CHROMIUM = os.environ.get("EMBEDSEARCH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EMBEDSEARCH_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROME_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,1000",
]
STARTUP_TIMEOUT = 90  # importing torch on a busy 2-core machine can take a while


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def embedsearch_command() -> list[str]:
    script = Path(sys.executable).parent / "embedsearch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "embedsearch.cli"]


def http(url: str, data: bytes | None = None, ctype: str | None = None
         ) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("e2e")
    from embedsearch import build_index

    build_index(make_collection(base / "images"), out=base / "demo", model="test:tiny")
    port = free_port()
    log_path = base / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*embedsearch_command(), "serve", "--index", str(base / "demo"), "--port",
             str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=base)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"embedsearch serve exited with {proc.returncode}:\n"
                            + log_path.read_text(errors="replace"))
            try:
                if http(url + "/health")[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not answer /health in time:\n"
                            + log_path.read_text(errors="replace"))
            time.sleep(0.25)
        yield {"url": url, "base": base, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: install Debian's chromium and "
                    "chromium-driver (.ci/install-browser does, as root)")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (dev extra)")
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}")
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    except WebDriverException as exc:
        pytest.skip(f"headless Chromium could not start here: {exc.msg}")
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / name))
    keep = os.environ.get("EMBEDSEARCH_E2E_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(keep) / name)


def test_page_classifies_an_upload_and_browses_neighbours(server: dict, browser,
                                                          tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, 20)
    query = tmp_path / "unseen_blue.jpg"
    draw_image("blue", 123_456, size=160).save(query, quality=90)

    d.get(server["url"] + "/")
    wait.until(lambda d: d.find_element(By.ID, "bundle-name").text == "demo")
    assert "24 images" in d.find_element(By.ID, "bundle-facts").text

    d.find_element(By.ID, "file-input").send_keys(str(query))
    wait.until(lambda d: d.find_element(By.ID, "pred-label").text.strip())
    assert d.find_element(By.ID, "pred-label").text == "blue"
    assert d.find_element(By.ID, "query-caption").text == "unseen_blue.jpg"
    top_bar = d.find_element(By.CSS_SELECTOR, ".method .bar-row")
    assert top_bar.get_attribute("data-cls") == "blue"

    cards = d.find_elements(By.CSS_SELECTOR, "#neighbours .neighbour")
    assert len(cards) == 12
    assert [c.find_element(By.CLASS_NAME, "chip").text for c in cards[:5]] == ["blue"] * 5
    thumbs_loaded = ("return [...document.querySelectorAll('#neighbours img')]"
                     ".every(i => i.complete && i.naturalWidth > 0)")
    wait.until(lambda d: d.execute_script(thumbs_loaded))
    screenshot(d, tmp_path, "e2e-upload.png")

    # Clicking a neighbour of another class searches from it and shows its own result.
    other = next(c for c in cards if c.find_element(By.CLASS_NAME, "chip").text != "blue")
    other_id, other_label = other.get_attribute("data-id"), other.find_element(
        By.CLASS_NAME, "chip").text
    other.click()
    wait.until(lambda d: d.find_element(By.ID, "query-caption").text == other_id
               and d.find_element(By.ID, "pred-label").text == other_label)
    assert "Indexed image labelled" in d.find_element(By.ID, "query-truth").text
    wait.until(lambda d: other_id not in [
        c.get_attribute("data-id") for c in d.find_elements(By.CSS_SELECTOR, ".neighbour")])
    wait.until(lambda d: d.execute_script(thumbs_loaded))
    assert d.execute_script("return location.hash").startswith("#id=")
    screenshot(d, tmp_path, "e2e-neighbour.png")

    # A file that is not an image gets a readable error, and the page keeps working.
    bad = tmp_path / "not_really.jpg"
    bad.write_text("this is text, not a JPEG")
    d.find_element(By.ID, "file-input").send_keys(str(bad))
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "HTTP 422" in d.find_element(By.ID, "error").text
    # ... and the previous answer is not left on screen as if it were this file's.
    assert not d.find_element(By.ID, "result").is_displayed()
    assert d.find_elements(By.CSS_SELECTOR, "#neighbours .neighbour") == []
    screenshot(d, tmp_path, "e2e-error.png")


def test_real_server_handles_concurrent_and_bad_requests(server: dict) -> None:
    import io

    def jpeg(cls: str, seed: int) -> bytes:
        buf = io.BytesIO()
        draw_image(cls, seed).save(buf, "JPEG")
        return buf.getvalue()

    queries = [(cls, jpeg(cls, 70_000 + i)) for i, cls in enumerate(["red", "green", "blue"] * 4)]
    url = server["url"] + "/predict"
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda q: http(url, q[1], "image/jpeg"), queries))
    for (cls, _), (status, body) in zip(queries, answers, strict=True):
        assert status == 200 and body["label"] == cls
    assert http(url, b"\x89PNG\r\n\x1a\n garbage", "image/png")[0] == 422
    assert http(url, b"x" * (11 * 1024 * 1024), "image/jpeg")[0] == 413
    assert http(url, b"hello", "text/plain")[0] == 415
    assert http(server["url"] + "/health")[0] == 200
    assert "Traceback" not in server["log"].read_text(errors="replace")
