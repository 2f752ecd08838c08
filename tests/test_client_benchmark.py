"""A short run of the client throughput benchmark, so that it keeps working (no timing is checked)."""

from __future__ import annotations

import pytest

# scripts/smoke.py runs a copy of tests/ without the benchmarks next to it
main = pytest.importorskip("benchmarks.client_throughput", reason="benchmarks/ is not beside tests/").main


def test_short_run_prints_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--messages", "2000", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    split = next(i for i, line in enumerate(lines) if line.startswith("consume variant"))
    rows, consumed = lines[2:split], lines[split + 1 :]
    names = [row.split("  ")[0] for row in rows]
    assert names[0] == "raw socket" and rows[0].endswith("1.00")
    assert len(rows) == 6
    assert any(name.startswith("Client.publish_many") for name in names)
    assert any(name.startswith("AsyncClient.publish_many") for name in names)
    waited = next(row for row in rows if row.startswith("Client.publish (waited"))
    assert waited.split()[-3] == "100", "1/20 of the messages, one round trip each"
    consumers = [row.split("  ")[0] for row in consumed]
    assert consumers[:2] == ["Client, plain", "Client, ack=True, client.ack per 100"]
    assert consumers[2].startswith("AsyncClient, plain (")
    assert consumers[3].startswith("AsyncClient, ack=True, client.ack per 100 (")
    assert consumed[0].endswith(" 1.00") and consumed[2].endswith(" 1.00")
    assert all(row.split()[-3] == "2000" for row in consumed), "every message consumed"
