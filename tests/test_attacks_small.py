"""Issue 10, items 8, 9 and 13: the small ones, and a plain v1 session as a sanity check.

- 8a: a refused connection is logged as ``connection -1`` on v1;
- 8b, 9: out-of-range integers end in an ``OverflowError`` traceback (``--max-backlog
  5000000000``), or worse, ``--port 99999`` listens on 34463 and ``--port 65536`` on a random
  port; every one must exit 2 with one error line on stderr;
- 8c: format characters (Cf: zero-width space, BOM, bidi controls, soft hyphen) and space
  separators (Zs) are accepted in topic names, so two topics can look the same;
- 8d: ``STATS CONNECTIONS`` (every client's address and subscriptions) needs no CONNECT;
- 13: a tab between fields is not a separator.

Errors are matched as ``ERROR <CODE> ...``, the fixed server's form.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from pigeon.testing import server_command
from tests import attack_kit as kit


@pytest.fixture(scope="module")
def shared() -> Iterator[kit.Server]:
    """One server for the tests that only send commands."""
    with kit.running() as proc:
        yield proc
        assert proc.stop() == 0, proc.text()


# ---------------------------------------------------------------- 8a


@pytest.mark.parametrize("loop", kit.LOOPS)
def test_a_refused_connection_is_not_logged_as_handle_minus_one(loop: str) -> None:
    with kit.running("--max-connections", "1", loop=loop) as proc:
        first = kit.connected(proc)
        second = proc.client()
        refusal = second.line()
        assert second.at_eof()
        assert first.ask("PING") == b"PONG"
        logged = proc.wait_log("(?i)too many connections|TOO_MANY_CONNECTIONS")
        assert logged, f"the refusal is not logged: {proc.text()}"
        assert "connection -1" not in proc.text(), f"logged as handle -1: {logged.string.strip()}"
        assert kit.coded("TOO_MANY_CONNECTIONS").fullmatch(refusal), refusal
        first.close()
        assert proc.stop() == 0, proc.text()


# ---------------------------------------------------------------- 8b and 9

HUGE = str(2**64)

OUT_OF_RANGE = [
    ("--max-backlog", "5000000000"),
    ("--max-backlog", HUGE),
    ("--max-line", HUGE),
    ("--max-connections", HUGE),
    ("--max-memory", HUGE),
    ("--max-subscriptions", HUGE),
    ("--max-topics", HUGE),
    ("--max-pending", HUGE),
    ("--port", "99999"),
    ("--port", "65536"),
    ("--port", "-1"),
]


@pytest.mark.parametrize(("flag", "value"), OUT_OF_RANGE, ids=[f"{f}={v}" for f, v in OUT_OF_RANGE])
def test_out_of_range_flags_exit_2_with_one_error_line(flag: str, value: str) -> None:
    args = [flag, value] if flag == "--port" else ["--port", "0", flag, value]
    proc = subprocess.Popen(
        [*server_command(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _, err = proc.communicate(timeout=8)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"still running after 8 s: {err}")
    assert "Traceback" not in err, err
    assert "listening on" not in err, err
    assert proc.returncode == 2, f"exit {proc.returncode}: {err}"
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    assert flag in errors[0], errors[0]


# ---------------------------------------------------------------- 8c


@pytest.mark.parametrize("char", kit.INVISIBLE, ids=[f"U+{ord(c):04X}" for c in kit.INVISIBLE])
def test_invisible_characters_in_topic_names_are_refused(shared: kit.Server, char: str) -> None:
    client = kit.connected(shared)
    bad_topic = kit.coded("BAD_TOPIC")
    for topic in (f"a{char}b", f"{char}lead", f"trail{char}"):
        reply = client.ask(f"SUBSCRIBE {client.client_id} {topic}")
        assert bad_topic.fullmatch(reply), f"SUBSCRIBE {kit.shown(topic.encode())}: {kit.shown(reply)}"
        reply = client.ask(f"PUBLISH {client.client_id} {topic} hello")
        assert bad_topic.fullmatch(reply), f"PUBLISH {kit.shown(topic.encode())}: {kit.shown(reply)}"
    client.close()


def test_visible_non_ascii_topic_names_still_work(shared: kit.Server) -> None:
    client = kit.connected(shared)
    for topic in ("café", "日本語", "emoji😀", "Ωμέγα"):
        client.subscribe(topic)
        client.publish(topic, "hi")
        assert client.line() == f"MESSAGE {topic} hi".encode()
        assert client.ask(f"UNSUBSCRIBE {client.client_id} {topic}") == f"UNSUBSCRIBED {topic}".encode()
    client.close()


# ---------------------------------------------------------------- 8d


@pytest.mark.parametrize("section", ["CONNECTIONS", "TOPICS", "connections"])
def test_stats_sections_need_connect(shared: kit.Server, section: str) -> None:
    anonymous = shared.client()
    reply = anonymous.ask(f"STATS {section}")
    assert kit.coded("NOT_CONNECTED").fullmatch(reply), reply[:200]
    anonymous.connect()
    assert anonymous.ask(f"STATS {section}").startswith(b"STATS "), "after CONNECT it answers"
    anonymous.close()


# ---------------------------------------------------------------- 13


@pytest.mark.parametrize("loop", kit.LOOPS)
def test_tabs_separate_fields_like_spaces(loop: str) -> None:
    with kit.running(loop=loop) as proc:
        sub, pub = kit.connected(proc), kit.connected(proc)
        s, p = sub.client_id, pub.client_id
        assert sub.ask(f"SUBSCRIBE\t{s}\tjobs") == b"SUBSCRIBED jobs"
        assert sub.ask(f"SUBSCRIBE \t{s}\t \tjobs2\t") == b"SUBSCRIBED jobs2"
        assert pub.ask(f"PUBLISH {p}\tjobs\thello") == b"PUBLISHED jobs"
        assert sub.line() == b"MESSAGE jobs hello"
        # the message is taken byte for byte after the one separator that ends the topic
        pub.send(f"PUBLISH\t{p}\tjobs\t\ta\tb c\t\n".encode())
        assert pub.line() == b"PUBLISHED jobs"
        assert sub.line() == b"MESSAGE jobs \ta\tb c\t"
        pub.send(f"PUBLISH\t{p} jobs\t\n".encode())  # an empty message
        assert pub.line() == b"PUBLISHED jobs"
        assert sub.line() == b"MESSAGE jobs "
        assert pub.ask("PING\t") == b"PONG"
        assert sub.ask(f"UNSUBSCRIBE\t{s}\tjobs") == b"UNSUBSCRIBED jobs"
        for client in (sub, pub):
            client.close()
        assert proc.stop() == 0, proc.text()


# ---------------------------------------------------------------- sanity


@pytest.mark.parametrize("loop", kit.LOOPS)
def test_plain_v1_session_still_works(loop: str) -> None:
    """The example session of docs/protocol.md, error replies matched by their start only."""
    with kit.running(loop=loop) as proc:
        c = proc.client()
        cid = c.connect()
        assert c.ask(f"SUBSCRIBE {cid} jobs") == b"SUBSCRIBED jobs"
        assert c.ask(f"PUBLISH {cid} jobs resize image 42") == b"PUBLISHED jobs"
        assert c.line() == b"MESSAGE jobs resize image 42"
        assert c.ask(f"publish {cid} jobs").startswith(b"ERROR ")
        assert c.ask("SUBSCRIBE c999999 jobs").startswith(b"ERROR ")
        assert c.ask("PING") == b"PONG"
        assert c.ask(f"UNSUBSCRIBE {cid} jobs") == b"UNSUBSCRIBED jobs"
        other = proc.client()
        oid = other.connect()
        assert other.ask(f"PUBLISH {oid} jobs queued") == b"PUBLISHED jobs"
        assert c.ask(f"SUBSCRIBE {cid} jobs") == b"SUBSCRIBED jobs"
        assert c.line() == b"MESSAGE jobs queued"
        stats = kit.stats(proc)
        assert stats["published"] == 2 and stats["delivered"] == 2
        assert c.ask("DISCONNECT") == b"DISCONNECTED"
        assert c.at_eof()
        other.close()
        assert proc.stop() == 0, proc.text()
