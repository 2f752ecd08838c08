"""The dashboard in a real headless browser (Debian's chromium and chromedriver), against a live broker."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("selenium", reason="drives the browser through selenium (pip install -e '.[test]')")

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from pigeon.testing import LineClient, ServerProcess
from tests.monitoring import get_json

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """A headless chromium driven through chromedriver."""
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def publish_for_a_while(pub: LineClient, stop: threading.Event) -> None:
    """Pipelined PUBLISH batches to 'jobs' until told to stop, each batch's replies read."""
    batch = f"PUBLISH {pub.client_id} jobs work\n".encode() * 50
    while not stop.is_set():
        pub.send(batch)
        pub.lines(50)


def read_until_closed(client: LineClient) -> None:
    """Swallow deliveries so the subscriber never fills its socket."""
    client.sock.settimeout(None)
    try:
        while client.sock.recv(1 << 20):
            pass
    except OSError:
        pass


def test_dashboard_shows_live_figures(
    monitored: tuple[ServerProcess, str], browser: webdriver.Chrome
) -> None:
    proc, url = monitored
    sub = proc.client()
    sub.connect()
    sub.subscribe("jobs")
    pub = proc.client()
    pub.connect()
    for i in range(5):
        pub.publish("idle", f"waiting-{i}")

    def text(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    def positive(element_id: str) -> bool:
        shown = text(element_id)
        return shown.isdigit() and int(shown) > 0

    reader = threading.Thread(target=read_until_closed, args=(sub,), daemon=True)
    reader.start()
    stop = threading.Event()
    sender = threading.Thread(target=publish_for_a_while, args=(pub, stop))
    sender.start()
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 20, poll_frequency=0.2)
        # live: while traffic runs, the rates shown rise above zero and the chart gets points
        wait.until(lambda _: positive("rate-in") and positive("rate-out"))
        wait.until(lambda _: int(browser.find_element(By.ID, "chart").get_attribute("data-points") or 0) >= 2)
    finally:
        stop.set()
        sender.join()

    # quiet now: the page must settle on exactly the server's figures
    stats = get_json(url + "stats")
    topics = get_json(url + "topics")
    expected_cards = {
        "connections": str(stats["connections"]),
        "topics-count": str(stats["topics"]),
        "published": str(stats["published"]),
        "delivered": str(stats["delivered"]),
        "backlog": str(stats["backlog_messages"]),
    }
    expected_rows = [
        (
            t["name"],
            str(t["subscribers"]),
            str(t["backlog_messages"]),
            str(t["published"]),
            str(t["delivered"]),
        )
        for t in topics
    ]

    def shows_server_figures(_: object) -> bool:
        cards = {k: text(k) for k in expected_cards}
        # read the whole table in one script: the page replaces its rows at every poll
        rows = browser.execute_script(
            "return [...document.querySelectorAll('#topics tbody tr')]"
            ".map(tr => [...tr.cells].map(td => td.textContent));"
        )
        return cards == expected_cards and [tuple(row) for row in rows] == expected_rows

    WebDriverWait(browser, 20, poll_frequency=0.2).until(shows_server_figures)
    assert stats["connections"] == 2 and stats["backlog_messages"] == 5
    assert [t["name"] for t in topics] == ["idle", "jobs"]
    assert stats["published"] > 5
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"dashboard-{proc.loop_name}.png"
    browser.save_screenshot(str(shot))
    print(f"dashboard screenshot: {shot}")
    assert shot.stat().st_size > 0
    sub.close()
    pub.close()
    reader.join(10)
