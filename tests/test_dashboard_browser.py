"""The dashboard in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium; nothing is downloaded), against a real
Hypercorn: ``python -m trio_bg serve tests/dashboard_app.py`` on a journal, with
running, failing, pending and dead-lettered tasks. The page shows them, its counts
change without a reload, *retry* runs a dead letter, *cancel* cancels a pending task,
and a request without the staff cookie is refused.

Without chromium or chromedriver these tests are skipped, saying so, unless
``TRIO_BG_TESTS_NEED_BROWSER=1`` (CI): then they fail. ``TRIO_BG_SCREENSHOTS=1`` also
writes the screenshots to docs/images/ (they always go to the test's tmp dir)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.browser

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

TESTS = Path(__file__).parent
DOCS_IMAGES = TESTS.parent / "docs" / "images"
BOUND = 20.0  # seconds any one wait may take (a noisy machine), never slept
LIVE = 5.0  # seconds a change may take to show without a reload (the contract: 2)
STAFF = {"staff": "staff-only-cookie"}


def _browser_or_skip() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    missing = " and ".join(
        name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path
    )
    reason = f"{missing} not installed (Debian: apt-get install chromium chromium-driver)"
    if os.environ.get("TRIO_BG_TESTS_NEED_BROWSER") == "1":
        pytest.fail(f"TRIO_BG_TESTS_NEED_BROWSER=1, but {reason}")
    pytest.skip(reason)


class Server:
    """``python -m trio_bg serve dashboard_app:app`` on a free port, its output kept."""

    def __init__(self, tmp: Path) -> None:
        self.gate = tmp / "gate"
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = ""
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "trio_bg", "serve", "dashboard_app:app"),
                *("--bind", "127.0.0.1:0", "--journal", str(tmp / "tasks.db")),
                *("--journal-lease", "1", "--max-running", "2", "--grace-period", "0"),
            ],
            cwd=TESTS,
            env=os.environ | {"TRIO_BG_TEST_GATE": str(self.gate)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(BOUND) or not self.url:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        self.client = httpx.Client(base_url=self.url, cookies=STAFF, timeout=BOUND)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if found := re.search(r"Running on (http://\S+)", line):
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()

    def add(self, kind: str, name: str) -> str:
        response = self.client.post("/add", params={"kind": kind, "name": name})
        assert response.status_code == 202
        return response.text

    def state(self) -> dict[str, Any]:
        response = self.client.get("/dashboard/state.json", headers={"cache-control": "no-cache"})
        assert response.status_code == 200
        state: dict[str, Any] = response.json()
        return state

    def cancel_all(self, *ids: str) -> None:
        """Cancel tasks through the dashboard's form, as its page would."""
        page = self.client.get("/dashboard/")
        token = re.search(r'data-token="([^"]+)"', page.text)
        assert token is not None
        form = {"token": token.group(1), "id": list(ids)}
        response = self.client.post("/dashboard/cancel", data=form, headers={"origin": self.url})
        assert response.status_code == 303

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(BOUND)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(BOUND)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _browser_or_skip()
    running = Server(tmp_path_factory.mktemp("dashboard"))
    try:
        yield running
    finally:
        running.client.close()
        running.stop()


@pytest.fixture(scope="module")
def browser(server: Server) -> Iterator[WebDriver]:
    chromium, chromedriver = _browser_or_skip()
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1600")
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=chromedriver)
    )
    driver.set_page_load_timeout(BOUND)
    try:
        yield driver
    finally:
        driver.quit()


def logged_in(driver: WebDriver, server: Server) -> None:
    driver.get(f"{server.url}/login")
    assert "welcome" in driver.find_element(By.TAG_NAME, "body").text


def wait(driver: WebDriver, seconds: float = BOUND) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, seconds, poll_frequency=0.05)


def table(driver: WebDriver, name: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f'tbody[data-table="{name}"]')


def row(driver: WebDriver, name: str, key: str) -> WebElement | None:
    found = table(driver, name).find_elements(By.CSS_SELECTOR, f'tr[data-key="{key}"]')
    return found[0] if found else None


def text_of(element: WebElement | None) -> str:
    return "" if element is None else element.text


def count(driver: WebDriver, key: str) -> int:
    return int(driver.find_element(By.CSS_SELECTOR, f'dd[data-count="{key}"]').text)


def test_a_request_without_the_staff_cookie_is_refused(browser: WebDriver, server: Server) -> None:
    browser.delete_all_cookies()
    browser.get(f"{server.url}/dashboard/")
    assert "Forbidden" in browser.find_element(By.TAG_NAME, "body").text
    assert not browser.find_elements(By.CSS_SELECTOR, "table")
    for path in ("/dashboard/state.json", "/dashboard/dashboard.js"):
        assert httpx.get(f"{server.url}{path}").status_code == 403


def test_the_page_shows_the_tasks_stays_live_and_retry_runs_a_dead_letter(
    browser: WebDriver, server: Server, tmp_path: Path
) -> None:
    logged_in(browser, server)
    server.state()  # the dashboard's first look: per-name times are recorded from now on
    held = server.add("hold", "invoice-run")
    try:
        failed = server.add("fail", "ann")
        dead = server.add("charge", "order-17")
        for _ in range(4):
            server.add("quick", "warm-up")
        wait(browser).until(lambda _: server.state()["system"]["dead"] == "1")

        browser.get(f"{server.url}/dashboard/")
        live_row = row(browser, "live", held)
        assert live_row is not None and "invoice-run: 4 of 10 pages" in live_row.text
        failed_row = row(browser, "ended", failed)
        assert failed_row is not None and "ValueError: card declined for ann" in failed_row.text
        dead_row = table(browser, "dead").find_element(By.CSS_SELECTOR, "tr[data-key]")
        assert "tests.dashboard_app.charge" in dead_row.text
        assert "ConnectionError" in dead_row.text and dead[:8] in dead_row.text
        browser.execute_script("window.notReloaded = true")

        completed = count(browser, "completed")  # live: more tasks, no reload
        for _ in range(3):
            server.add("quick", "live")
        wait(browser, LIVE).until(lambda d: count(d, "completed") >= completed + 3)
        assert browser.execute_script("return window.notReloaded") is True
        age = browser.find_element(By.CSS_SELECTOR, f'tr[data-key="{held}"] td[data-since]')
        first_age = age.text
        wait(browser, LIVE).until(lambda _: age.text != first_age)  # the ages tick

        screenshots(browser, tmp_path)
        server.gate.touch()  # the payment provider is back: retry the dead letter
        retry = dead_row.find_element(By.CSS_SELECTOR, "button.retry")
        assert str(retry.get_attribute("aria-label")).startswith("Retry tests.dashboard_app.charge")
        retry.click()
        wait(browser, LIVE).until(lambda d: "done" in d.find_element(By.ID, "notice").text)
        wait(browser).until(lambda d: "completed" in text_of(row(d, "ended", dead)))
        wait(browser).until(lambda d: "No dead letters" in table(d, "dead").text)
        assert browser.execute_script("return window.notReloaded") is True
    finally:
        server.cancel_all(held)


def test_cancel_on_a_pending_task_cancels_it(browser: WebDriver, server: Server) -> None:
    logged_in(browser, server)
    holders = [server.add("hold", f"slot-{n}") for n in (1, 2)]  # --max-running 2
    pending = server.add("hold", "waits-its-turn")
    try:
        browser.get(f"{server.url}/dashboard/")
        wait(browser).until(lambda d: row(d, "live", pending) is not None)
        waiting = row(browser, "live", pending)
        assert waiting is not None and "pending" in waiting.text
        button = waiting.find_element(By.CSS_SELECTOR, "button.cancel")
        button.send_keys("\n")  # from the keyboard
        wait(browser, LIVE).until(lambda d: row(d, "live", pending) is None)
        wait(browser, LIVE).until(lambda d: row(d, "ended", pending) is not None)
        ended = row(browser, "ended", pending)
        assert ended is not None and "cancelled" in ended.text
        ended_rows = server.state()["tables"]["ended"]["rows"]
        assert {"badge": "cancelled"} in next(r["cells"] for r in ended_rows if r["key"] == pending)
        assert all(row(browser, "live", holder) is not None for holder in holders)
    finally:
        server.cancel_all(*holders, pending)


def screenshots(driver: WebDriver, tmp_path: Path) -> None:
    """The page at a desktop's width and a phone's: in tmp_path, and in docs/images/
    with ``TRIO_BG_SCREENSHOTS=1``."""
    places = [tmp_path] + ([DOCS_IMAGES] if os.environ.get("TRIO_BG_SCREENSHOTS") == "1" else [])
    for name, width in (("dashboard.png", 1280), ("dashboard-phone.png", 412)):
        driver.set_window_size(width, 1000)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, min(int(height) + 120, 4000))
        for place in places:
            place.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(str(place / name))
    driver.set_window_size(1280, 1600)
