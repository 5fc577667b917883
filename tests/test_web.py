"""The browser playground at ``GET /``, driven in real headless Chromium through Selenium.

The worker is a real ``orcd serve`` child process (the tiny model, a 16k context, so a job
with a large ``max_tokens`` is still streaming when the test presses Stop). The tests click
what a person clicks and read what the page shows; the job's record is checked over HTTP.
Screenshots go to ``$ORCD_ARTIFACTS`` (else the test's tmp folder).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from orcd._tinymodel import build_tiny_gguf

from .test_process import LONG_CTX, orcd_serve, sse

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 20.0
LONG = LONG_CTX - 200

BROWSER_MISSING = "" if os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK) \
    else f"{CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``orcd serve`` (tiny model, 16k context) for the module; its base URI."""
    tmp = tmp_path_factory.mktemp("web")
    model = build_tiny_gguf(tmp / "tiny-16k.gguf", n_ctx=LONG_CTX)
    with orcd_serve(tmp, "--model", str(model), "--n-ctx", str(LONG_CTX),
                    "--max-tokens-out", str(LONG_CTX), "--worker-id", "web-test") as served:
        yield served.uri


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    if BROWSER_MISSING:
        pytest.skip(BROWSER_MISSING)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1360,1400",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver, worker: str) -> Iterator[WebDriver]:
    """The playground, freshly loaded, with no token kept from an earlier test."""
    browser.get(f"{worker}/")
    browser.execute_script("localStorage.clear()")
    browser.get(f"{worker}/")
    until(browser, lambda: "web-test" in text(browser, "health"))
    browser.get_log("performance")  # start each test with an empty network log
    yield browser
    # Responses with an error status are logged by Chromium as "network" errors; those
    # are part of what tests provoke. Anything else severe is a bug in the page.
    errors = [e for e in browser.get_log("browser")
              if e["level"] == "SEVERE" and e["source"] != "network"]
    assert not errors, errors


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("ORCD_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def until(driver: WebDriver, condition: Callable[[], Any]) -> Any:
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda _: condition())


def text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def fill(driver: WebDriver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def job_row(driver: WebDriver, job_id: str) -> WebElement | None:
    rows = driver.find_elements(By.CSS_SELECTOR, f'#jobs tbody tr[data-job-id="{job_id}"]')
    return rows[0] if rows else None


def row_state(driver: WebDriver, job_id: str) -> str | None:
    row = job_row(driver, job_id)
    return None if row is None else row.get_attribute("data-state")


def record(worker: str, job_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{worker}/jobs/{job_id}", timeout=5)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


# ----------------------------------------------------------------------------- tests


def test_the_page_and_its_files_are_served_from_orcd_alone(worker: str) -> None:
    page = httpx.get(f"{worker}/", timeout=5)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for path, kind in [("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")]:
        asset = httpx.get(f"{worker}{path}", timeout=5)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert f'"{path}"' in page.text
        # Nothing from elsewhere: no CDN, no web font, no remote call.
        assert not re.search(r"https?://|@import|url\(\s*['\"]?(?!data:)", asset.text), path
    # The one URL in the page is the SVG namespace inside the data: favicon.
    assert re.findall(r"https?://[^'\"\s)]+", page.text) == ["http://www.w3.org/2000/svg"]


def test_send_streams_tokens_and_stop_shows_cancelled(page: WebDriver, worker: str,
                                                      artifacts: Path) -> None:
    fill(page, "prompt", "Tell me a very long story about a lighthouse.")
    fill(page, "max_tokens", str(LONG))
    fill(page, "job_id", "web-stop")
    page.find_element(By.ID, "send").click()

    until(page, lambda: text(page, "run-state") == "running" and len(text(page, "output")) > 50)
    grown_from = len(text(page, "output"))
    until(page, lambda: len(text(page, "output")) > grown_from)  # tokens keep appearing
    assert "web-stop · orcd-tiny-seed0 · seed" in text(page, "run-meta")
    until(page, lambda: row_state(page, "web-stop") == "running")
    row = job_row(page, "web-stop")
    assert row is not None and row.find_elements(By.CSS_SELECTOR, "button[data-cancel]")

    page.find_element(By.ID, "stop").click()
    until(page, lambda: "CANCELLED" in text(page, "terminal"))
    terminal = text(page, "terminal")
    assert re.search(r"client_request · \d+(\.\d)? m?s after Stop", terminal), terminal
    assert text(page, "run-state") == "cancelled"
    until(page, lambda: row_state(page, "web-stop") == "cancelled")
    row = job_row(page, "web-stop")
    assert row is not None and not row.find_elements(By.CSS_SELECTOR, "button[data-cancel]")
    assert "client_request" in row.text

    job = record(worker, "web-stop")
    assert job["state"] == "cancelled" and job["cancel_reason"] == "client_request"
    assert 0 < job["tokens_out"] < LONG
    until(page, lambda: f"{job['tokens_out']}/{LONG} tokens" in text(page, "run-stats"))
    assert page.find_element(By.ID, "send").is_enabled()
    assert not page.find_element(By.ID, "stop").is_enabled()
    page.save_screenshot(str(artifacts / "playground-cancelled.png"))


def test_a_finished_job_shows_its_end(page: WebDriver, worker: str) -> None:
    fill(page, "max_tokens", "12")
    fill(page, "job_id", "web-end")
    page.find_element(By.ID, "prompt").send_keys("\ue009\ue007")  # Ctrl+Enter sends
    until(page, lambda: "END" in text(page, "terminal"))
    assert re.search(r"max_tokens · 12 tokens · [\d.]+ m?s", text(page, "terminal"))
    assert text(page, "run-state") == "completed"
    until(page, lambda: row_state(page, "web-end") == "completed")
    assert record(worker, "web-end")["state"] == "completed"


def test_health_panel_shows_the_worker(page: WebDriver, worker: str) -> None:
    health = httpx.get(f"{worker}/health", timeout=5).json()
    panel = text(page, "health")
    for shown in (health["model"], health["device"], f"busy / {health['slots']}",
                  f"{health['queued_jobs']} waiting", str(health["context_length"])):
        assert shown in panel, (shown, panel)
    assert text(page, "health-badge") == "ready"


def test_the_jobs_table_cancels_another_clients_job(page: WebDriver, worker: str) -> None:
    events: list[tuple[str, dict[str, Any]]] = []

    def read() -> None:
        body = {"job_id": "web-other", "prompt": "go", "max_tokens": LONG}
        with httpx.stream("POST", f"{worker}/execute", json=body, timeout=30) as resp:
            events.extend(sse(resp))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        until(page, lambda: row_state(page, "web-other") == "running")
        row = job_row(page, "web-other")
        assert row is not None
        row.find_element(By.CSS_SELECTOR, "button[data-cancel]").click()
        until(page, lambda: row_state(page, "web-other") == "cancelled")
    finally:
        reader.join(WAIT_S)
    assert events[-1][0] == "error" and events[-1][1]["code"] == "CANCELLED"
    assert record(worker, "web-other")["cancel_reason"] == "client_request"


def test_a_refused_request_shows_the_error_envelope(page: WebDriver) -> None:
    fill(page, "max_tokens", "999999")
    page.find_element(By.ID, "send").click()
    until(page, lambda: "REJECTED" in text(page, "terminal"))
    assert "INVALID_REQUEST: max_tokens" in text(page, "terminal")
    assert text(page, "run-state") == "rejected"
    assert page.find_element(By.ID, "send").is_enabled()


def test_the_bearer_token_is_kept_and_sent(page: WebDriver, worker: str) -> None:
    fill(page, "token", "t0k3n")
    page.find_element(By.ID, "prompt").click()  # leaving the field stores it
    page.get(f"{worker}/")
    until(page, lambda: page.find_element(By.ID, "token").get_attribute("value") == "t0k3n")
    until(page, lambda: "web-test" in text(page, "health"))

    def sent_authorization() -> set[str]:
        seen = set()
        for entry in page.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                request = message["params"]["request"]
                if request["url"].startswith(f"{worker}/jobs"):
                    seen.add(request["headers"].get("Authorization", ""))
        return seen

    seen: set[str] = set()
    until(page, lambda: seen.update(sent_authorization()) or "Bearer t0k3n" in seen)
    assert seen == {"Bearer t0k3n"}


def test_the_page_follows_the_light_or_dark_scheme(page: WebDriver, artifacts: Path) -> None:
    """The page follows the system's colour scheme."""
    backgrounds = {}
    for scheme in ("light", "dark"):
        page.execute_cdp_cmd("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": scheme}]})
        backgrounds[scheme] = page.execute_script(
            "return getComputedStyle(document.body).backgroundColor")
        page.save_screenshot(str(artifacts / f"playground-{scheme}.png"))
    page.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    assert backgrounds["light"] != backgrounds["dark"]
