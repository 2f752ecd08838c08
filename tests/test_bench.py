"""The load generator and the comparison script, run briefly against real processes."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pigeon.bench.load import Result, format_table
from pigeon.testing import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--duration", "0.3", "--connections", "20", "--samples", "200", "--no-progress"]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pigeon.bench", *args], capture_output=True, text=True, timeout=120
    )


def test_every_workload_against_a_server(server: ServerProcess) -> None:
    done = bench("--port", str(server.port), "--json", *SHORT)
    assert done.returncode == 0, done.stderr
    results = {r["workload"]: r for r in json.loads(done.stdout)["results"]}
    assert list(results) == ["pipe", "queue", "fanin", "ackqueue", "latency", "connections"]
    for name in ("pipe", "queue", "fanin", "ackqueue"):
        assert results[name]["msgs_per_s"] > 0
        assert results[name]["broker_cpu_percent"] is not None  # the broker was found by its port
    latency = results["latency"]
    assert 0 < latency["p50_us"] <= latency["p99_us"] <= latency["p999_us"]
    assert results["connections"]["bytes_per_connection"] is not None


def test_ackqueue_acknowledges_every_message_it_published(server: ServerProcess) -> None:
    done = bench("--port", str(server.port), "--workloads", "ackqueue", "--json", *SHORT)
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)["results"]
    assert result["workload"] == "ackqueue" and result["msgs_per_s"] > 0
    client = server.client()
    client.connect()
    reply = client.ask("STATS")
    assert reply.startswith(b"STATS ")
    stats = json.loads(reply.split(b" ", 1)[1])
    client.close()
    assert stats["published"] > 1000  # several batches of 500, so acks were ranges over many of them
    assert stats["acks"] == stats["published"] == stats["delivered"]
    assert stats["unacked"] == stats["redelivered"] == stats["backlog_messages"] == 0
    assert stats["commands"]["ack"] >= stats["published"] // 100
    assert stats["errors"] == {k: 0 for k in stats["errors"]}


def test_durable_workloads_count_confirmations_and_acknowledgements(tmp_path: Path) -> None:
    # durable has no consumer: the backlog holds the whole run
    server = ServerProcess(
        "--data-dir", str(tmp_path / "data"), "--fsync", "always", "--max-backlog", "50000000"
    )
    try:
        done = bench(
            "--port", str(server.port), "--workloads", "durable,durable_ackqueue4", "--json", *SHORT
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout)["results"]
        assert [r["workload"] for r in results] == ["durable", "durable_ackqueue4"]
        assert all(r["msgs_per_s"] > 0 for r in results)
        assert results[0]["note"] == "1 pub, 1000 unconfirmed, 0 consumers"
        client = server.client()
        client.connect()
        stats = json.loads(client.ask("STATS").split(b" ", 1)[1])
        client.close()
    finally:
        server.stop()
    # every publish of durable_ackqueue4 was acknowledged; durable's stay, nobody consumed them
    assert stats["durable"] and stats["log_syncs"] > 0
    assert stats["published"] == stats["acks"] + stats["backlog_messages"] > stats["acks"] > 0
    assert stats["errors"] == {k: 0 for k in stats["errors"]}


def test_table_output_and_message_size_through_pigeon_cli(server: ServerProcess) -> None:
    cli = [sys.executable, "-c", "import sys; from pigeon.cli.client import main; sys.exit(main())"]
    done = subprocess.run(
        [*cli, "bench", "--port", str(server.port), "--workloads", "pipe", "--size", "1000", *SHORT],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split()[:3] == ["workload", "M", "msgs/s"]
    assert row.startswith("pipe") and float(row.split()[1]) > 0


def test_chart(server: ServerProcess, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / "bench.png"
    done = bench("--port", str(server.port), "--workloads", "pipe", "--chart", str(chart), *SHORT)
    assert done.returncode == 0, done.stderr
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_unreachable_broker_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    done = bench("--port", str(port), "--workloads", "latency", *SHORT)
    assert done.returncode == 1
    assert f"bench: 127.0.0.1:{port}:" in done.stderr


def test_bad_workload_is_rejected() -> None:
    done = bench("--workloads", "pipe,bogus")
    assert done.returncode == 2
    assert "unknown workload 'bogus'" in done.stderr


@pytest.fixture
def sink() -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pigeon.bench.sink", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    match = re.search(r":(\d+)$", proc.stdout.readline().strip())
    assert match, "sink did not report its port"
    yield int(match.group(1))
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


@pytest.mark.slow
def test_generator_ceiling_against_the_null_broker(sink: int) -> None:
    done = bench("--port", str(sink), "--workloads", "pipe,queue", "--json", *SHORT)
    assert done.returncode == 0, done.stderr
    for result in json.loads(done.stdout)["results"]:
        assert result["msgs_per_s"] > 0


def test_format_table_leaves_missing_figures_blank() -> None:
    table = format_table([Result("pipe", msgs_per_s=2.5e6, note="n"), Result("latency", p50_us=10.0)])
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["pipe", "2.500", "-"]
    assert lines[2].split()[:6] == ["latency", "-", "-", "-", "10.0", "-"]


@pytest.mark.slow
def test_compare_quick_prints_peers_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "compare.py"),
            "--quick",
            "--workloads",
            "pipe,ackqueue,latency",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr
    header = done.stdout.splitlines()[0].split()
    assert header[:3] == ["workload", "figure", "pigeon"]
    assert "ceiling" in header
    results = json.loads(out.read_text())
    assert results["pigeon"][0]["workload"] == "pipe" and results["pigeon"][0]["msgs_per_s"] > 0
    for peer in ("nats", "redis", "rabbitmq"):
        if shutil.which(f"{peer}-server"):
            assert peer in header and f"pigeon/{peer}" in header
            by_workload = {r["workload"]: r for r in results[peer]}
            assert by_workload["ackqueue"]["msgs_per_s"] > 0
            if peer != "rabbitmq":  # RabbitMQ runs ackqueue only
                assert by_workload["pipe"]["msgs_per_s"] > 0
        else:
            assert f"{peer}: not installed, skipped" in done.stdout
    assert "target pipe: >= 2.0 x redis" in done.stdout
    assert "target ackqueue: >= 0.7 x queue" in done.stdout


@pytest.mark.slow
def test_compare_durable_quick_prints_the_durable_table(tmp_path: Path) -> None:
    out = tmp_path / "durable.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--durable", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    header = done.stdout.splitlines()[0].split()
    assert header[:5] == ["workload", "figure", "pigeon-memory", "pigeon-everysec", "pigeon-always"]
    results = json.loads(out.read_text())
    for name in ("pigeon-memory", "pigeon-everysec", "pigeon-always"):
        assert {r["workload"] for r in results[name]} <= {"durable", "durable_ackqueue4"}
        assert all(r["msgs_per_s"] > 0 for r in results[name])
    assert "target durable: pigeon-always >= 3.0 x redis-always" in done.stdout
    for peer, names in (("redis", ("redis-everysec", "redis-always")), ("rabbitmq", ("rabbitmq",))):
        if shutil.which(f"{peer}-server"):
            assert all(results[n][0]["msgs_per_s"] > 0 for n in names)


@pytest.mark.slow
def test_recovery_kills_and_restarts_each_broker_and_consumes_everything() -> None:
    peers = [
        b
        for b in ("redis", "jetstream")
        if shutil.which("nats-server" if b == "jetstream" else "redis-server")
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "recovery.py"), "--messages", "3000", "--consume",
         "--brokers", ",".join(["pigeon", *peers])],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["pigeon", *peers]
    for line in lines:
        assert "filled 3000 messages of 64 bytes" in line and "all 3000 acked by 4 consumers" in line
    assert "recovered 3000 messages on 1 topics" in lines[0]


def test_recovery_restarts_reports_the_medians_of_its_rounds() -> None:
    recovery = [sys.executable, str(ROOT / "benchmarks" / "recovery.py"), "--brokers", "pigeon"]
    done = subprocess.run(
        [*recovery, "--messages", "1000", "--restarts", "3"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    rounds = re.search(r"medians of 3 restarts \(ready ([0-9. ]+) s, first message ([0-9. ]+) s\)", line)
    assert rounds is not None, line
    ready, first = ([float(v) for v in group.split()] for group in rounds.groups())
    assert len(ready) == len(first) == 3
    # the median of 3 is one of them: printed as it is
    assert f"ready after {sorted(ready)[1]:.3f} s, first message {sorted(first)[1]:.3f} s" in line
    assert "recovered 1000 messages on 1 topics" in line
    refused = subprocess.run([*recovery, "--restarts", "0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "error: --restarts must be 1 or more, not 0" in refused.stderr


def test_recovery_floor_times_python_alone_starting_and_answering() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "recovery.py"), "--brokers", "floor", "--restarts", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    rounds = re.search(r"medians of 3 starts \(ready ([0-9. ]+) s, first reply ([0-9. ]+) s\)", line)
    assert line.startswith("floor: start_floor.py") and rounds is not None, line
    ready, first = ([float(v) for v in group.split()] for group in rounds.groups())
    assert all(0 < r <= f for r, f in zip(ready, first, strict=True)), line
    assert f"ready after {sorted(ready)[1]:.3f} s, first reply {sorted(first)[1]:.3f} s" in line


@pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (apt-get install etcd-server)")
def test_cluster_spread_times_a_publisher_over_topics_of_one_owner_and_of_two() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster", "--spread", "--repeats", "1", "--messages", "2000"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {line[:36].strip(): line[36:].split() for line in done.stdout.splitlines()[3:]}
    assert list(rows) == [
        "one process, 8 topics",
        "through n0, 4 topics of n0",
        "through n0, 4 topics of n1",
        "through n0, n0 and n1 in turns",
        "Client, n0 and n1 in turns",
        "ClusterClient, n0 and n1 in turns",
    ], done.stdout
    assert all(float(row[0].replace(",", "")) > 0 for row in rows.values()), done.stdout


def test_compare_skips_peers_that_are_not_installed(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick", "--workloads", "latency"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": str(Path(sys.executable).parent)},
    )
    assert done.returncode == 0, done.stderr
    assert "nats: not installed, skipped" in done.stdout
    assert "redis: not installed, skipped" in done.stdout
    assert done.stdout.splitlines()[0].split()[2:] == ["pigeon"]


@pytest.mark.slow
def test_tls_benchmark_quick_measures_every_broker_over_tls() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.tls", "--quick", "--sizes", "64"],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = lines[0].split()
    assert header[:5] == ["workload", "size", "figure", "pigeon", "pigeon-tls"]
    assert "pigeon-tls/pigeon" in header
    brokers = [name for name in header[3:] if "/" not in name]
    rates = [line.split() for line in lines[1:] if "M msgs/s" in line]
    assert [row[:2] for row in rates] == [["pipe", "64"], ["queue", "64"]]
    for row in rates:
        # the brokers' columns follow "<size> B M msgs/s"; Pigeon's, plain and TLS, counted deliveries
        figures = dict(zip(brokers, row[5:], strict=False))
        assert float(figures["pigeon"]) > 0 and float(figures["pigeon-tls"]) > 0, row
    if shutil.which("nats-server"):
        assert "nats-tls" in header and "pigeon-tls/nats-tls" in header
    else:
        assert "nats-server: not installed, skipped" in done.stdout


def test_cluster_scaling_simulation_spreads_work_by_the_clusters_own_rules(tmp_path: Path) -> None:
    from benchmarks.cluster_scaling import simulate

    one = simulate(1, 1000, 0.0, 1.0, redirect=True)
    assert one.throughput == pytest.approx(1.0)
    for n in (2, 4, 8):
        redirect = simulate(n, 1000, 0.0, 1.0, redirect=True)
        random = simulate(n, 1000, 0.0, 1.0, redirect=False)
        # even traffic over 256 slots: near n nodes' worth, never more; forwarding costs a share
        assert 0.75 * n <= redirect.throughput <= n
        assert random.throughput < redirect.throughput
    # one topic is served by one owner: it never goes faster than one node, whatever the nodes
    assert simulate(8, 1, 0.0, 1.0, redirect=True).throughput == pytest.approx(1.0)
    # skewed traffic saturates the busiest owner first
    assert (
        simulate(8, 1000, 1.0, 1.0, redirect=True).throughput < simulate(8, 1000, 0.0, 1.0, True).throughput
    )
    out = tmp_path / "scaling.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster_scaling", "--nodes", "1,3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert {(r["nodes"], r["clients"], r["skew"]) for r in rows} == {
        (n, c, s) for n in (1, 3) for c in ("redirect", "random") for s in (0.0, 1.0)
    }
