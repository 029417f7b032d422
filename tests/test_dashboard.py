"""The dashboard in a real browser: headless Chromium, driven by Selenium,
on a ``celery-pg dashboard`` process, with a ``celery-pg worker`` running
what the page puts back. A screenshot lands in ``test-artifacts/`` (or
``$PGNOTIFY_TEST_ARTIFACTS``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Queue

from tests.test_transport import collect, drain_until
from tests.workers import E2E

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "a-token-for-the-test"


def _browser() -> Any:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Chromium and its driver are not installed (apt install chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,900")
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _browser()
    yield driver
    driver.quit()


@pytest.fixture
def dashboard(e2e: E2E, broker_url: str) -> Iterator[str]:
    """A ``celery-pg dashboard`` process allowing changes with TOKEN; its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "celery_pgnotify.cli", "dashboard", "--url", broker_url]
    argv += ["--schema", e2e.options["schema"], "--port", str(port), "--token", TOKEN]
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None and "dashboard of schema" in process.stdout.readline()
            yield f"http://127.0.0.1:{port}/"
        finally:
            process.terminate()
            process.wait(timeout=15)


def _artifacts() -> Path:
    where = Path(os.environ.get("PGNOTIFY_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    where.mkdir(parents=True, exist_ok=True)
    return where


def _wait(condition: Any, timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception:  # noqa: BLE001 - an element not rendered yet
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_the_page_lists_queues_and_a_dead_letter_retried_from_it_runs(
    e2e: E2E, broker_url: str, browser: Any, dashboard: str
) -> None:
    from selenium.webdriver.common.by import By

    for i in range(3):
        e2e.send("record", f"waiting-{i}", queue="later")
    e2e.send("record", "put-back")
    # A consumer rejects the task: dead-lettered, with the reason.
    with Connection(broker_url, transport_options=e2e.options) as consumer:
        received: list[Any] = []
        with Consumer(consumer, [Queue("celery")], callbacks=[collect(received, ack=False)]):
            drain_until(consumer, received, 1)
            received[0][1].reject(requeue=False)

    browser.get(dashboard + f"#token={TOKEN}")
    ready = _wait(
        lambda: (
            browser.find_element(By.CSS_SELECTOR, 'tr[data-queue="later"] td.ready').text == "3"
        ),
        what="the queue 'later' with 3 ready",
    )
    assert ready
    row = _wait(
        lambda: browser.find_element(By.CSS_SELECTOR, "#dead-letters tr[data-dead-letter]"),
        what="the dead letter",
    )
    assert "tests.e2e_app.record" in row.text and "rejected" in row.text
    assert "put-back" in row.text  # the preview shows the task's arguments
    assert "changes allowed" in browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(_artifacts() / "dashboard.png"))

    row.find_element(By.CSS_SELECTOR, "button").click()  # retry
    alert = _wait(lambda: browser.switch_to.alert, what="the confirmation")
    assert "back on celery" in alert.text
    alert.accept()
    _wait(
        lambda: not browser.find_elements(By.CSS_SELECTOR, "#dead-letters tr[data-dead-letter]"),
        what="the dead letter to leave the page",
    )
    empty = browser.find_element(By.CSS_SELECTOR, "#dead-letters td.empty")
    assert empty.text == "none: every message ran, or waits to"
    assert empty.get_attribute("colspan") == "7"
    e2e.pg_worker("-Q", "celery")
    assert e2e.wait_events("put-back", ["run"]) == ["run"]


def test_without_the_token_nothing_changes_and_other_hosts_read_nothing(
    e2e: E2E, dashboard: str
) -> None:
    e2e.send("record", "stays", queue="kept")
    request = urllib.request.Request(
        dashboard + "api/purge",
        data=json.dumps({"queue": "kept"}).encode(),
        headers={"X-Dashboard-Token": "wrong", "Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    refused.value.close()

    def kept() -> list[int]:
        with urllib.request.urlopen(dashboard + "api/state", timeout=10) as response:
            state = json.loads(response.read())
        return [q["ready"] for q in state.get("queues", []) if q["queue"] == "kept"]

    assert _wait(kept, what="the queue 'kept' on the page") == [1]
    # Another site's name made to resolve to 127.0.0.1 (DNS rebinding) reads nothing.
    rebound = urllib.request.Request(dashboard + "api/state", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(rebound, timeout=10)
    assert refused.value.code == 403
    refused.value.close()
