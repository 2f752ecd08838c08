"""The dashboard in a real headless browser (Debian's chromium and chromedriver), against a live broker."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("selenium", reason="drives the browser through selenium (pip install -e '.[test]')")

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from pigeon.cluster.etcd import EtcdProcess
from pigeon.testing import LineClient, ServerProcess
from tests.monitoring import ACK_FIGURES, ACK_FLAGS, ack_traffic, get_json, start_monitored

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


def acknowledge_for_a_while(pub: LineClient, consumer: LineClient, stop: threading.Event) -> None:
    """Batches of PUBLISH to 'tasks', each delivered to the consumer and acked as one range, until told
    to stop; the last ACK is settled when this returns."""
    batch = f"PUBLISH {pub.client_id} tasks task\n".encode() * 50
    acked = 0
    while not stop.is_set():
        pub.send(batch)
        pub.lines(50)
        consumer.lines(50)
        consumer.send(f"ACK {consumer.client_id} {acked + 1}-{acked + 50}")
        acked += 50
    assert consumer.ask("PING") == b"PONG"  # ACKs have no reply: this one comes after the last


def shows_positive(browser: webdriver.Chrome, element_id: str) -> bool:
    """Whether an element shows a whole number above zero."""
    shown = str(browser.find_element(By.ID, element_id).text)
    return shown.isdigit() and int(shown) > 0


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
        return shows_positive(browser, element_id)

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
    stats = wait_for_the_server_figures(browser, url)
    assert stats["connections"] == 2 and stats["backlog_messages"] == 5
    # the busiest topic first: jobs took every published message but the five waiting in idle
    assert [row[0] for row in table(browser, "topics")] == ["jobs", "idle"]
    assert stats["published"] > 5
    assert "of 1.0 GiB" in text("memory")
    assert not stats["durable"] and not browser.find_element(By.ID, "log").is_displayed()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"dashboard-{proc.loop_name}.png"
    browser.save_screenshot(str(shot))
    print(f"dashboard screenshot: {shot}")
    assert shot.stat().st_size > 0
    sub.close()
    pub.close()
    reader.join(10)


# the id of each card showing a server-wide figure, and the figure's STATS key
CARDS = {
    "connections": "connections",
    "topics-count": "topics",
    "published": "published",
    "delivered": "delivered",
    "backlog": "backlog_messages",
    "refused": "refused",
    "write-timeouts": "write_timeouts",
    "read-pauses": "read_pauses",
    "lost": "lost",
    "unacked": "unacked",
    "acks": "acks",
    "nacks": "nacks",
    "redelivered": "redelivered",
    "ack-timeouts": "ack_timeouts",
    "delayed": "delayed",
    "dead-lettered": "dead_lettered",
    "dead-letters-dropped": "dead_letters_dropped",
    "publishers-held": "publishers_held",
    "publish-holds": "publish_holds",
}

# the columns of the busiest topics' table, as STATS TOPICS keys
TOPIC_COLUMNS = (
    "name",
    "subscribers",
    "backlog_messages",
    "published",
    "delivered",
    "unacked",
    "acked",
    "nacked",
    "redelivered",
    "dead_lettered",
)


def wait_for_the_server_figures(browser: webdriver.Chrome, url: str) -> dict[str, Any]:
    """Wait until every card and table shows what the server's JSON says (the server being quiet);
    return its /stats."""
    stats = get_json(url + "stats")
    busiest = get_json(url + "topics/busiest?count=100")["topics"]
    connections = get_json(url + "connections?count=50")["connections"]
    expected_cards = {card: str(stats[key]) for card, key in CARDS.items()}
    expected_topics = [[str(t[key]) for key in TOPIC_COLUMNS] for t in busiest]
    expected_connections = [connection_row(c) for c in connections]

    def shows_server_figures(_: object) -> bool:
        cards = {card: browser.find_element(By.ID, card).text for card in CARDS}
        memory = browser.find_element(By.ID, "memory")
        memory_shown = (memory.get_attribute("data-bytes"), memory.get_attribute("data-limit"))
        return (
            cards == expected_cards
            and table(browser, "topics") == expected_topics
            and table(browser, "connections-table") == expected_connections
            and memory_shown == (str(stats["memory_bytes"]), str(stats["memory_limit_bytes"]))
        )

    WebDriverWait(browser, 20, poll_frequency=0.2).until(shows_server_figures)
    return dict(stats)


def connection_row(c: dict[str, object]) -> list[str]:
    """A connection's row as the dashboard shows it."""
    state = "closing" if c["closing"] else "paused" if c["paused"] else "open"
    return [
        str(c["client_id"]),
        str(c["address"]),
        str(c["subscriptions_total"]),
        str(c["pending_bytes"]),
        str(c["messages_in"]),
        str(c["messages_out"]),
        str(c["unacked"]),
        "yes" if c["held"] else "no",
        state,
    ]


def test_dashboard_shows_acknowledgements_and_flow_control(browser: webdriver.Chrome) -> None:
    proc, url = start_monitored(*ACK_FLAGS)
    consumer, pub = ack_traffic(proc)
    browser.get(url)
    stats = wait_for_the_server_figures(browser, url)
    assert {key: stats[key] for key in ACK_FIGURES} == ACK_FIGURES
    held = [row for row in table(browser, "connections-table") if row[0] == pub.client_id]
    assert [row[6:8] for row in held] == [["0", "yes"]]
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard-acks.png"))
    assert proc.stop() == 0
    consumer.close()


def test_dashboard_shows_the_log_on_disk(tmp_path: Path, browser: webdriver.Chrome) -> None:
    proc, url = start_monitored(
        "--data-dir", str(tmp_path / "data"), "--fsync", "always", "--max-disk", "8000000"
    )
    pub = proc.client()
    pub.connect()
    for i in range(5):
        pub.publish("idle", f"kept-{i}")  # PUBLISHED under always: on disk, synced
    browser.get(url)

    def figure(element_id: str, attribute: str | None = None) -> str:
        element = browser.find_element(By.ID, element_id)
        return str(element.get_attribute(attribute) if attribute else element.text)

    def shows_the_log(_: object) -> bool:
        stats = get_json(url + "stats")
        return browser.find_element(By.ID, "log").is_displayed() and (
            figure("log-disk", "data-bytes"),
            figure("log-live"),
            figure("log-unsynced", "data-bytes"),
            figure("log-syncs"),
            figure("log-write-failed"),
        ) == (
            str(stats["log_disk_bytes"]),
            str(stats["log_live_messages"]),
            str(stats["log_unsynced_bytes"]),
            str(stats["log_syncs"]),
            "yes" if stats["log_write_failed"] else "no",
        )

    WebDriverWait(browser, 20, poll_frequency=0.2).until(shows_the_log)
    stats = get_json(url + "stats")
    assert stats["log_live_messages"] == 5 and stats["log_syncs"] > 0 and stats["log_disk_bytes"] > 0
    assert figure("log-write-failed") == "no" and "of 7.6 MiB" in figure("log-disk")
    assert browser.find_element(By.ID, "log-meter").is_displayed()
    # no segment sealed yet: no compaction pass
    assert (figure("log-compaction"), figure("log-compactions"), figure("log-reclaimed", "data-bytes")) == (
        "not yet",
        "0",
        "0",
    )
    # figures of passes that ran (a pass needs sealed segments: 64 MiB each by default), drawn in
    # one script so that no poll comes in between
    shown = browser.execute_script(
        "showLog(Object.assign({}, arguments[0], {log_compacting: true, log_compactions: 12,"
        " log_compaction_failures: 1, log_compacted_segments: 30, log_compaction_removed_segments: 9,"
        " log_compaction_reclaimed_bytes: 3 * 1048576, log_compaction_last_seconds: 0.25,"
        " log_compaction_last_at: Date.now() / 1000 - 5}));"
        "const e = id => document.getElementById(id);"
        "return [e('log-compaction').textContent, e('log-compactions').textContent,"
        " e('log-compactions').className, e('log-compacted').textContent, e('log-reclaimed').textContent,"
        " e('log-compaction-last').textContent];",
        stats,
    )
    assert shown == [
        "running",
        "12 (1 failed)",
        "value failing",
        "30 (9 removed)",
        "3.0 MiB",
        "0.250 s, 5 s ago",
    ]
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard-log.png"))
    pub.close()
    assert proc.stop() == 0


def test_dashboard_shows_the_recovery(tmp_path: Path, browser: webdriver.Chrome) -> None:
    data = tmp_path / "data"
    proc, _ = start_monitored("--data-dir", str(data))
    pub = proc.client()
    pub.connect()
    pub.send("".join(f"PUBLISH {pub.client_id} idle kept-{i}\n" for i in range(1000)))
    pub.lines(1000)
    pub.close()
    assert proc.stop() == 0
    proc, url = start_monitored("--data-dir", str(data))
    proc.wait_for_log(" topics from ")  # the restore is over
    browser.get(url)
    stats = get_json(url + "stats")
    assert stats["log_recovered_messages"] == 1000 and not stats["log_recovering"]

    def figures() -> list[str]:
        return list(
            browser.execute_script(
                "const e = id => document.getElementById(id);"
                "return [e('log-recovery').textContent, e('log-restored').dataset.bytes,"
                " e('log-restored').dataset.total, e('log-recovered').textContent,"
                " String(e('log-recovery-meter').hidden)];"
            )
        )

    expected = [
        "done",
        str(stats["log_recovery_done_bytes"]),
        str(stats["log_recovery_total_bytes"]),
        "1000",
        "true",
    ]
    WebDriverWait(browser, 20, poll_frequency=0.2).until(lambda _: figures() == expected)
    assert stats["log_recovery_total_bytes"] > 0
    # a restore under way (a large log restores in about a second, less than the page's poll):
    # the page drawn from such figures, in one script so that no poll comes in between
    shown = browser.execute_script(
        "showLog(Object.assign({}, arguments[0], {log_recovering: true, log_recovery_done_bytes: 1024,"
        " log_recovery_total_bytes: 4096, log_recovered_messages: 7}));"
        "const e = id => document.getElementById(id);"
        "return [e('log-recovery').textContent, e('log-restored').textContent,"
        " e('log-recovered').textContent, e('log-recovery-meter').hidden,"
        " e('log-recovery-meter').firstElementChild.style.width];",
        stats,
    )
    assert shown == ["restoring", "1.0 KiB of 4.0 KiB", "7", False, "25%"]
    assert proc.stop() == 0


def table(browser: webdriver.Chrome, table_id: str) -> list[list[str]]:
    """The text of every cell of a table's body, read in one script (the page replaces rows at every poll)."""
    rows = browser.execute_script(
        f"return [...document.querySelectorAll('#{table_id} tbody tr')]"
        ".map(tr => [...tr.cells].map(td => td.textContent));"
    )
    return [list(row) for row in rows]


def test_dashboard_shows_the_rate_of_acks(
    monitored: tuple[ServerProcess, str], browser: webdriver.Chrome
) -> None:
    proc, url = monitored
    pub, consumer = proc.client(), proc.client()
    pub.connect()
    assert consumer.ask(f"SUBSCRIBE {consumer.connect()} tasks ACK") == b"SUBSCRIBED tasks"
    stop = threading.Event()
    worker = threading.Thread(target=acknowledge_for_a_while, args=(pub, consumer, stop))
    worker.start()
    try:
        browser.get(url)
        WebDriverWait(browser, 20, poll_frequency=0.2).until(lambda _: shows_positive(browser, "rate-acks"))
    finally:
        stop.set()
        worker.join()
    stats = wait_for_the_server_figures(browser, url)
    assert stats["acks"] == stats["published"] > 0 and stats["unacked"] == 0
    pub.close()
    consumer.close()


def test_dashboard_pages_through_connections(
    monitored: tuple[ServerProcess, str], browser: webdriver.Chrome
) -> None:
    proc, url = monitored
    clients = [proc.client() for _ in range(3)]
    for client in clients:
        client.connect()
    pages = []
    cursor = 0
    while True:
        page = get_json(f"{url}connections?cursor={cursor}&count=1")
        pages.append([connection_row(c) for c in page["connections"]])
        cursor = page["next"]
        if cursor == 0:
            break
    assert len(pages) == 3
    browser.get(url + "?connections_page=1")
    wait = WebDriverWait(browser, 20, poll_frequency=0.2)
    next_page = browser.find_element(By.ID, "next-page")
    first_page = browser.find_element(By.ID, "first-page")

    def shows(rows: list[list[str]]) -> Callable[[object], bool]:
        # the byte counts of a page may move between polls: compare client ids and addresses
        return lambda _: [row[:2] for row in table(browser, "connections-table")] == [r[:2] for r in rows]

    for number, expected in enumerate(pages, 1):
        wait.until(shows(expected))
        assert browser.find_element(By.ID, "page-info").text == f"page {number}"
        if number < len(pages):
            wait.until(lambda _: next_page.is_enabled())
            next_page.click()
    wait.until(lambda _: not next_page.is_enabled())
    first_page.click()
    wait.until(
        lambda _: [row[:2] for row in table(browser, "connections-table")] == [r[:2] for r in pages[0]]
    )
    wait.until(lambda _: not first_page.is_enabled())
    assert browser.find_element(By.ID, "page-info").text == "page 1"
    for client in clients:
        client.close()


def test_dashboard_shows_the_nodes_of_a_cluster(browser: webdriver.Chrome, etcd: EtcdProcess) -> None:
    proc, url = start_monitored("--cluster", etcd.endpoint, "--node-name", "n1", "--cluster-ttl", "2")
    browser.get(url)
    wait = WebDriverWait(browser, 20)
    wait.until(lambda _: browser.find_element(By.ID, "cluster-section").is_displayed())
    wait.until(lambda _: table(browser, "cluster-table") == [["n1", f"{proc.host}:{proc.port}", "256"]])
    assert "this node: n1" in browser.find_element(By.ID, "cluster-note").text
    assert proc.stop() == 0


def test_dashboard_hides_the_cluster_of_a_broker_that_is_no_node(browser: webdriver.Chrome) -> None:
    proc, url = start_monitored()
    browser.get(url)
    # a poll has been shown: the status line says how long the broker is up
    WebDriverWait(browser, 20).until(lambda _: browser.find_element(By.ID, "status").text.startswith("up "))
    assert not browser.find_element(By.ID, "cluster-section").is_displayed()
    assert proc.stop() == 0
