"""Run the attacks of issue 10 against a real ``pigeon`` process and print each one's figures as a table.

Every attack starts its own server (``python -m pigeon``, or
``$PIGEON_TEST_SERVER_CMD``) on a free port and talks to it over loopback
sockets; memory is read from the server's ``/proc/<pid>/status`` (VmRSS, and
VmHWM for the peak). The same attack functions back ``tests/test_attacks_*.py``
(``tests/attack_kit.py``); the tests assert what the fixed broker must do, this
module only measures. It lives beside the tests it shares its attacks with
and runs from the repository's top folder.

    python -m tests.attacks baseline                 # an idle server's RSS
    python -m tests.attacks stats-flood              # 1: STATS CONNECTIONS never read
    python -m tests.attacks lost --trials 30         # 2: acknowledged messages after FIN/RST/half-close
    python -m tests.attacks memory-empty             # 3a: empty messages vs --max-memory 1 MiB
    python -m tests.attacks memory-small             # 3b: 1-byte messages vs --max-memory 32 MiB
    python -m tests.attacks memory-unfinished        # 3c: 1,000 unfinished 1 MiB lines vs 64 MiB
    python -m tests.attacks never-read               # 4a: 30 clients send junk and never read
    python -m tests.attacks dead-subscribers         # 4b: two subscribers stop reading
    python -m tests.attacks hash-flood               # 5: 60,000 colliding topic names
    python -m tests.attacks monitoring               # 6: /metrics and /topics with 100,000 topics
    python -m tests.attacks signals                  # 7: SIGHUP, SIGUSR1, SIGQUIT, SIGTERM, SIGINT
    python -m tests.attacks small                    # 8, 9, 13: flags, ports, topic names, tabs
    python -m tests.attacks all --loop asyncio

``--loop uvloop|asyncio`` picks the server's event loop (default uvloop).
Flags the server does not take yet (``--write-timeout`` on v1) are left out and
named in the output. Some attacks take GiBs on v1: ``stats-flood`` runs its
3,000 lines only under an address-space limit, and the memory attacks stop once
the server's RSS passes ``--stop-above`` MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from pigeon.testing import server_command
from tests import attack_kit as kit

MiB = kit.MiB


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a Markdown table (pastes straight into notes)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")
    sys.stdout.flush()


def mib(kib: int) -> float:
    return kib / 1024


def start(args: argparse.Namespace, *flags: str) -> contextlib.AbstractContextManager[kit.Server]:
    """``kit.running`` with the flags the server takes; says which it left out."""
    known, missing = kit.split_unknown_flags(flags)
    if missing:
        print(f"(the server does not take {' '.join(missing)}: left out)")
    return kit.running(*known, loop=args.loop)


# ---------------------------------------------------------------- commands


def cmd_baseline(args: argparse.Namespace) -> None:
    rows: list[tuple[Any, ...]] = []
    for loop in ("uvloop", "asyncio"):
        proc = kit.Server(loop=loop)
        time.sleep(1.0)
        rss, hwm = proc.memory()
        rows.append((loop, mib(proc.baseline_kib), mib(rss), mib(hwm), proc.stop()))
    table("Idle server", ["loop", "RSS at start (MiB)", "RSS after 1 s", "VmHWM", "exit on SIGTERM"], rows)


def cmd_stats_flood(args: argparse.Namespace) -> None:
    rows: list[tuple[Any, ...]] = []
    runs: list[tuple[int, int | None]] = [(300, None), (args.lines, 4 << 30), (args.lines, 1 << 30)]
    for lines, limit in runs:
        with kit.running(loop=args.loop, address_space=limit) as proc:
            result = kit.stats_flood(proc, lines=lines, settle=args.settle)
            code = result.exit_code if result.exit_code is not None else proc.stop()
            pings = kit.percentiles([ms / 1000 for ms in result.ping_ms])
            rows.append(
                (
                    lines,
                    "none" if limit is None else f"{limit >> 20} MiB",
                    result.reply_bytes,
                    mib(result.baseline_kib),
                    mib(result.peak_kib),
                    mib(result.rss_kib),
                    pings["max_ms"],
                    result.ping_failures,
                    code,
                    result.crash_log.strip().replace("\n", " / ")[:80] or "-",
                )
            )
    table(
        f"1. STATS CONNECTIONS flood, 10,000 subscriptions of 255 bytes ({args.loop})",
        [
            "STATS lines",
            "RLIMIT_AS",
            "one reply (bytes)",
            "RSS start (MiB)",
            "VmHWM (MiB)",
            "RSS end (MiB)",
            "bystander PING max (ms)",
            "PING failures",
            "exit code",
            "log",
        ],
        rows,
    )


def cmd_lost(args: argparse.Namespace) -> None:
    rows: list[tuple[Any, ...]] = []
    for busy, variant in [(busy, variant) for busy in (0, 100) for variant in kit.VARIANTS]:
        with kit.running(loop=args.loop) as proc:
            loss = kit.lost_after_close(proc, variant, trials=args.trials, busy=busy)
            proc.stop()
        rows.append(
            (
                variant,
                busy or "-",
                loss.trials,
                loss.acked,
                loss.received,
                loss.lost,
                loss.losing_trials,
                loss.duplicated,
                loss.unacked,
                loss.requeued,
                loss.seconds,
            )
        )
    table(
        f"2. Bursts of 2,000 to two subscribers, one of which just closed ({args.loop})",
        [
            "close",
            "STATS lines first (the test's 100)",
            "trials",
            "acked",
            "received",
            "lost",
            "losing trials",
            "duplicated",
            "unacked delivered",
            "requeued",
            "s",
        ],
        rows,
    )


def _flood_table(title: str, flood: kit.Flood, message: str) -> None:
    table(
        title,
        [
            "message",
            "--max-memory",
            "s",
            "PUBLISH sent",
            "PUBLISHED",
            "ERROR MEMORY_FULL",
            "any ERROR",
            "other replies",
            "backlog_messages",
            "backlog_bytes",
            "RSS start (MiB)",
            "VmHWM (MiB)",
            "stopped early",
        ],
        [
            (
                message,
                flood.limit,
                flood.seconds,
                flood.sent,
                flood.accepted,
                flood.refused_memory,
                flood.errors,
                flood.other_replies,
                flood.backlog_messages,
                flood.backlog_bytes,
                mib(flood.baseline_kib),
                mib(flood.peak_kib),
                flood.stopped_early,
            )
        ],
    )
    if flood.first_other:
        print(f"first other reply: {flood.first_other[:120]!r}")


def _memory_flood(args: argparse.Namespace, limit: int, message: bytes, title: str, label: str) -> None:
    """Publish ``message`` round robin to a server under ``--max-memory limit`` and print the figures."""
    with kit.running("--max-memory", str(limit), loop=args.loop) as proc:
        flood = kit.publish_flood(
            proc, limit, message, seconds=args.seconds, stop_above_kib=args.stop_above * 1024
        )
        proc.stop()
    _flood_table(f"{title} ({args.loop})", flood, label)


def cmd_memory_empty(args: argparse.Namespace) -> None:
    _memory_flood(args, 1 * MiB, b"", "3a. Empty messages over 1,332 topics", "empty")


def cmd_memory_small(args: argparse.Namespace) -> None:
    _memory_flood(args, 32 * MiB, b"x", "3b. 1-byte messages over 1,332 topics", "1 byte")


def cmd_memory_unfinished(args: argparse.Namespace) -> None:
    limit = 64 * MiB
    if not kit.room_for_sockets(args.connections + 100):
        sys.exit("the open-files limit is too low for this many connections")
    with kit.running("--max-memory", str(limit), loop=args.loop) as proc:
        result = kit.unfinished_lines(proc, limit, connections=args.connections)
        rss_after = mib(proc.memory()[0])
        proc.stop()
    table(
        f"3c. Unfinished 1 MiB lines ({args.loop})",
        [
            "connections",
            "--max-memory",
            "bytes sent",
            "sent all",
            "got MEMORY_FULL",
            "closed",
            "other replies",
            "RSS start (MiB)",
            "VmHWM (MiB)",
            "RSS after (MiB)",
            "bystander PING",
        ],
        [
            (
                result.connections,
                limit,
                result.bytes_sent,
                result.fully_sent,
                result.memory_full,
                result.closed,
                result.other_replies,
                mib(result.baseline_kib),
                mib(result.peak_kib),
                rss_after,
                result.bystander_ok,
            )
        ],
    )
    if result.first_other:
        print(f"first other reply: {result.first_other[:120]!r}")


def cmd_never_read(args: argparse.Namespace) -> None:
    flags = ("--idle-timeout", "2", "--write-timeout", "2", "--max-connections", "40")
    with start(args, *flags) as proc:
        result = kit.never_read(proc, stop_above_kib=args.stop_above * 1024)
        proc.stop()
    sent = sorted(result.sent)
    table(
        f"4a. 30 clients send junk lines and never read, {' '.join(flags)} ({args.loop})",
        [
            "sent per client min/median/max (bytes)",
            "last send progress (s)",
            "RSS start (MiB)",
            "VmHWM (MiB)",
            "RSS after sending (MiB)",
            "all closed after (s)",
            "still open",
            "RSS then (MiB)",
            "new clients PONG",
            "refused",
        ],
        [
            (
                f"{sent[0]:,} / {sent[len(sent) // 2]:,} / {sent[-1]:,}",
                result.last_progress,
                mib(result.baseline_kib),
                mib(result.peak_kib),
                mib(result.rss_kib),
                "never" if result.closed_after is None else f"{result.closed_after:.1f}",
                result.connections_after,
                mib(result.rss_after_kib),
                result.new_clients_ok,
                result.new_clients_refused,
            )
        ],
    )
    if result.first_refusal:
        print(f"first refusal: {result.first_refusal[:120]!r}")


def cmd_dead_subscribers(args: argparse.Namespace) -> None:
    with start(args, "--write-timeout", "2") as proc:
        result = kit.dead_subscribers(proc)
        proc.stop()
    allowed = (4 * MiB + result.kernel_bytes) // result.line_bytes
    table(
        f"4b. Two subscribers stop reading, 100,000 messages of 200 bytes, --write-timeout 2 ({args.loop})",
        [
            "PUBLISHED",
            "kernel held for them (bytes)",
            "both closed after (s)",
            "still open, pending bytes",
            "third subscriber got",
            "the test wants at least",
            "in order",
            "duplicates",
            "backlog left",
            "requeued",
        ],
        [
            (
                result.acked,
                result.kernel_bytes,
                "never (20 s)" if result.closed_after is None else f"{result.closed_after:.1f}",
                ", ".join(f"{p:,}" for p in result.stuck_pending) or "-",
                result.received,
                result.messages - allowed,
                result.in_order,
                result.duplicates,
                result.backlog_left,
                result.requeued,
            )
        ],
    )


def cmd_hash_flood(args: argparse.Namespace) -> None:
    start_gen = time.perf_counter()
    colliding = kit.colliding_names(args.hash_topics)
    gen_seconds = time.perf_counter() - start_gen
    randoms = kit.random_names(args.hash_topics)
    buckets = {kit.fnv1a(n) & 0x1FFFF for n in colliding}
    print(f"{len(colliding):,} colliding names (low 17 bits: {len(buckets)} distinct) in {gen_seconds:.2f} s")
    rows: list[tuple[Any, ...]] = []
    with kit.running(loop=args.loop) as proc:
        for kind, names in (("random", randoms), ("colliding", colliding)):
            result = kit.create_topics(proc, names, kind)
            rows.append(
                (
                    kind,
                    result.topics,
                    result.published,
                    result.seconds,
                    result.ping_ms["p50_ms"],
                    result.ping_ms["p99_ms"],
                    result.ping_ms["max_ms"],
                )
            )
        proc.stop()
    table(
        f"5. Creating {args.hash_topics:,} topics with one PUBLISH each, pipelined, one server, "
        f"random first ({args.loop})",
        ["names", "topics", "PUBLISHED", "s", "bystander PING p50 (ms)", "p99", "max"],
        rows,
    )
    print(f"ratio colliding/random: {rows[1][3] / rows[0][3]:.1f}")
    flood = kit.hash_flood(colliding, randoms, args.loop)
    table(
        f"5. The test's measure: a fresh server per run, 3 runs each, colliding runs given up after "
        f"3 x best random + 5 s ({args.loop})",
        ["random runs (s)", "colliding runs (s)", "given up", "ratio of the best runs"],
        [
            (
                " / ".join(f"{v:.3f}" for v in flood.random_seconds),
                " / ".join(f"{v:.3f}" for v in flood.colliding_seconds),
                flood.gave_up,
                flood.ratio,
            )
        ],
    )


def cmd_monitoring(args: argparse.Namespace) -> None:
    names = [f"topic.{i:06d}" for i in range(args.monitor_topics)]
    rows: list[tuple[Any, ...]] = []
    with kit.running("--http-port", "0", loop=args.loop) as proc:
        url = kit.monitoring_url(proc)
        acked = kit.publish_to_topics(proc, names)
        print(f"{acked:,} topics made")
        idle = kit.Pinger(proc, interval=0.005)
        time.sleep(2)
        quiet = kit.percentiles(idle.stop())
        rows.append(("(no scrape)", 0, "-", quiet["p50_ms"], quiet["p99_ms"], quiet["max_ms"]))
        for path in ("/metrics", "/topics"):
            result = kit.scrape_while_pinging(proc, url, path, scrapes=args.scrapes)
            rows.append(
                (
                    path,
                    result.body_bytes,
                    f"{min(result.seconds):.2f} / {max(result.seconds):.2f}",
                    result.ping_ms["p50_ms"],
                    result.ping_ms["p99_ms"],
                    result.ping_ms["max_ms"],
                )
            )
        client = kit.connected(proc, timeout=60)
        begin = time.perf_counter()
        reply = client.ask("STATS TOPICS")
        stats_seconds = time.perf_counter() - begin
        rows.append(("STATS TOPICS", len(reply) + 1, f"{stats_seconds:.2f}", "-", "-", "-"))
        client.close()
        status, _ = kit.http_get(url, "/stats", host="evil.example")
        print(f"GET /stats with Host: evil.example -> {status}")
        proc.stop()
    table(
        f"6. Monitoring with {args.monitor_topics:,} topics, {args.scrapes} scrapes in a row ({args.loop})",
        ["request", "body (bytes)", "s min / max", "bystander PING p50 (ms)", "p99", "max"],
        rows,
    )


def cmd_signals(args: argparse.Namespace) -> None:
    rows: list[tuple[Any, ...]] = []
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT):
        with kit.running(loop=args.loop) as proc:
            pub = kit.connected(proc)
            for i in range(5):
                pub.publish("held", f"m{i}")
            before = len(proc.log)
            proc.proc.send_signal(sig)
            time.sleep(1.0)
            alive = proc.alive()
            serving = False
            if alive:
                try:
                    serving = kit.connected(proc).ask("PING") == b"PONG"
                except (OSError, EOFError):
                    serving = False
            code = proc.stop()
            logged = [line.strip() for line in proc.log[before:] if line.strip()]
            rows.append((sig.name, alive, serving, code, " / ".join(logged)[:100] or "(nothing)"))
    table(
        f"7. Signals with 5 messages in a backlog ({args.loop})",
        [
            "signal",
            "alive after 1 s",
            "PING answered",
            "exit code (after SIGTERM if alive)",
            "log after the signal",
        ],
        rows,
    )


def _run_server_flags(flags: Sequence[str]) -> tuple[int | str, str, bool]:
    """Start the server with ``flags``: its exit code (or 'running'), the telling stderr line, a traceback?"""
    proc = subprocess.Popen(
        [*server_command(), *flags], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        _, err = proc.communicate(timeout=5)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        code = "running"
    lines = [line for line in err.splitlines() if line.strip()]
    shown = next(
        (line for line in lines if "rror" in line or "listening" in line), lines[-1] if lines else ""
    )
    return code, shown.strip()[:110], "Traceback" in err


def cmd_small(args: argparse.Namespace) -> None:
    # 8a: the log line of a refused connection
    with kit.running("--max-connections", "1", loop=args.loop) as proc:
        first = kit.connected(proc)
        second = proc.client()
        refusal = second.line()
        time.sleep(0.3)
        first.close()
        proc.stop()
    logged = [line.strip() for line in proc.log if "too many connections" in line]
    table(
        "8a. --max-connections 1, a second connection",
        ["reply", "log line"],
        [(refusal.decode(), logged[0][24:] if logged else "(none)")],
    )
    rows: list[tuple[Any, ...]] = []
    huge = str(2**64)
    out_of_range: list[tuple[str, str]] = [
        ("--max-backlog", "5000000000"),
        ("--max-line", huge),
        ("--max-connections", "2147483648"),
        ("--max-connections", huge),
        ("--max-memory", huge),
        ("--max-subscriptions", "2147483648"),
        ("--max-topics", huge),
        ("--max-pending", huge),
        ("--port", "99999"),
        ("--port", "65536"),
        ("--port", "-1"),
    ]
    for flags in out_of_range:
        code, shown, traceback = _run_server_flags(["--port", "0", *flags] if flags[0] != "--port" else flags)
        rows.append((" ".join(flags), code, traceback, shown))
    table("8b, 9. Out-of-range flags", ["flags", "exit code", "Traceback", "stderr"], rows)
    rows = []
    with kit.running(loop=args.loop) as proc:
        subscriber, publisher = kit.connected(proc), kit.connected(proc)
        for char in kit.INVISIBLE:
            topic = f"a{char}b"
            sub = subscriber.ask(f"SUBSCRIBE {subscriber.client_id} {topic}")
            pub = publisher.ask(f"PUBLISH {publisher.client_id} p{char}q hi")
            rows.append((f"U+{ord(char):04X}", kit.shown(sub), kit.shown(pub)))
        table(
            "8c. Invisible characters in topic names", ["character", "SUBSCRIBE a<c>b", "PUBLISH p<c>q"], rows
        )
        rows = []
        anonymous = proc.client()
        for section in ("CONNECTIONS", "TOPICS"):
            reply = anonymous.ask(f"STATS {section}")
            rows.append((f"STATS {section}", reply[:100].decode("utf-8", "replace")))
        table("8d. STATS sections before CONNECT", ["command", "reply (first 100 bytes)"], rows)
        rows = []
        tabbed = kit.connected(proc)
        cid = tabbed.client_id
        for line in (f"SUBSCRIBE\t{cid}\tjobs", f"PUBLISH {cid}\tjobs\thello"):
            reply = tabbed.ask(line)
            rows.append((line.replace("\t", "\\t"), reply.decode()))
        table("13. Tabs between fields", ["line", "reply"], rows)
        proc.stop()


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "baseline": cmd_baseline,
    "stats-flood": cmd_stats_flood,
    "lost": cmd_lost,
    "memory-empty": cmd_memory_empty,
    "memory-small": cmd_memory_small,
    "memory-unfinished": cmd_memory_unfinished,
    "never-read": cmd_never_read,
    "dead-subscribers": cmd_dead_subscribers,
    "hash-flood": cmd_hash_flood,
    "monitoring": cmd_monitoring,
    "signals": cmd_signals,
    "small": cmd_small,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("attack", choices=[*COMMANDS, "all"])
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--lines", type=int, default=3000, help="stats-flood: STATS CONNECTIONS lines")
    parser.add_argument("--settle", type=float, default=30.0, help="stats-flood: longest wait, seconds")
    parser.add_argument("--trials", type=int, default=30, help="lost: trials per close variant")
    parser.add_argument("--seconds", type=float, default=15.0, help="memory-*: how long to publish")
    parser.add_argument("--connections", type=int, default=1000, help="memory-unfinished: connections")
    parser.add_argument(
        "--stop-above",
        type=int,
        default=6144,
        metavar="MIB",
        help="memory attacks: stop once RSS passes this",
    )
    parser.add_argument("--hash-topics", type=int, default=60_000, help="hash-flood: topics of each kind")
    parser.add_argument("--monitor-topics", type=int, default=100_000, help="monitoring: topics")
    parser.add_argument("--scrapes", type=int, default=10, help="monitoring: scrapes of each path")
    args = parser.parse_args(argv)
    print(f"server: {' '.join(server_command())} --loop {args.loop}")
    for name in COMMANDS if args.attack == "all" else [args.attack]:
        COMMANDS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
