"""Issue 10, item 7: signals an operator sends must do what operators expect, and say so in the log.

On v1 SIGHUP, SIGUSR1 and SIGQUIT kill the broker at once without a log line (exit -1, -10, -3),
and SIGTERM or SIGINT drop every backlog without saying so. After the fix: SIGHUP is logged and
the broker keeps serving; SIGUSR1 logs the counters and the broker keeps serving; SIGQUIT shuts
down gracefully like SIGTERM (exit 0); and a shutdown logs how many messages it drops from memory.
"""

from __future__ import annotations

import re
import signal

import pytest

from tests import attack_kit as kit


def _backlog_of_five(proc: kit.Server) -> None:
    pub = kit.connected(proc)
    for i in range(5):
        pub.publish("held", f"m{i}")
    pub.close()


def _signal_logged(proc: kit.Server, sig: signal.Signals) -> int:
    """Leave a backlog of five, send ``sig``, and wait for a log line that names it; where the log
    stood before the signal."""
    _backlog_of_five(proc)
    mark = len(proc.log)
    proc.proc.send_signal(sig)
    assert proc.wait_log(sig.name, start=mark), f"no log line about {sig.name}: {proc.text()}"
    return mark


def _still_serving(proc: kit.Server) -> None:
    assert proc.alive(), f"exit {proc.proc.poll()}: {proc.text()}"
    client = kit.connected(proc)
    assert client.ask("PING") == b"PONG"
    sub = kit.connected(proc)
    sub.subscribe("held")
    assert sub.lines(5) == [f"MESSAGE held m{i}".encode() for i in range(5)], "the backlog was kept"
    client.close()
    sub.close()


@pytest.mark.parametrize("loop", kit.LOOPS)
def test_sighup_is_logged_and_the_broker_keeps_serving(loop: str) -> None:
    with kit.running(loop=loop) as proc:
        _signal_logged(proc, signal.SIGHUP)
        _still_serving(proc)
        assert proc.stop() == 0, proc.text()


@pytest.mark.parametrize("loop", kit.LOOPS)
def test_sigusr1_logs_the_counters_and_the_broker_keeps_serving(loop: str) -> None:
    with kit.running(loop=loop) as proc:
        mark = _signal_logged(proc, signal.SIGUSR1)
        assert proc.wait_log(r"published=5\b", start=mark), f"no counters in the log: {proc.text()}"
        _still_serving(proc)
        assert proc.stop() == 0, proc.text()


@pytest.mark.parametrize("loop", kit.LOOPS)
def test_sigquit_shuts_down_gracefully(loop: str) -> None:
    with kit.running(loop=loop) as proc:
        client = kit.connected(proc)
        mark = len(proc.log)
        code = proc.stop(signal.SIGQUIT)
        assert code == 0, f"exit {code}: {proc.text()}"
        assert any(re.search("SIGQUIT|shutting down", line) for line in proc.log[mark:]), proc.text()
        assert client.at_eof(), "the connection was closed"


@pytest.mark.parametrize("loop", kit.LOOPS)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT], ids=lambda s: s.name)
def test_shutdown_logs_how_many_messages_it_drops(sig: signal.Signals, loop: str) -> None:
    with kit.running(loop=loop) as proc:
        _backlog_of_five(proc)
        mark = len(proc.log)
        code = proc.stop(sig)
        assert code == 0, f"exit {code}: {proc.text()}"
        dropped = [m for m in (re.search(r"dropping (\d+) messages?", line) for line in proc.log[mark:]) if m]
        assert dropped, f"no 'dropping N messages' in the log: {proc.text()}"
        assert dropped[0].group(1) == "5"
