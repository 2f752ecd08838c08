"""The soak test's short version: 20 seconds of churn, every message accounted for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


@pytest.mark.slow
@pytest.mark.skipif(not SOAK.exists(), reason="needs the source tree's scripts/")
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_short_soak() -> None:
    command = [sys.executable, str(SOAK), "--duration", "20", "--clients", "100", "--max-rss-growth", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["published_acked"] > 0
    assert report["duplicates"] == report["lost"] == report["delivered_unacked"] == 0
    assert report["published_acked"] == report["delivered"]
