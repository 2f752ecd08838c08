"""The atheris fuzzer in CI: a short run, and a replay of every input it ever found a bug with."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZER = ROOT / "fuzz" / "fuzz_core.py"
# crash-* inputs once found a bug; seed-* are corpus inputs that reach deep states (limits, drops)
REGRESSIONS = sorted(p for p in (ROOT / "fuzz" / "regressions").glob("*-*") if p.suffix != ".md")
RUNS = 20_000

pytest.importorskip("atheris")
pytestmark = pytest.mark.skipif(not FUZZER.exists(), reason="needs the source tree's fuzz/")


@pytest.mark.slow
def test_short_fuzz_run(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    command = [
        sys.executable,
        str(FUZZER),
        str(corpus),
        f"-dict={ROOT / 'fuzz' / 'pigeon.dict'}",
        f"-runs={RUNS}",
        "-seed=1",
        f"-artifact_prefix={tmp_path}/",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Done {RUNS} runs" in result.stderr


def test_the_replay_always_has_inputs() -> None:
    assert any(p.name.startswith("seed-") for p in REGRESSIONS)


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_fuzz_regression(path: Path) -> None:
    spec = importlib.util.spec_from_file_location("fuzz_core", FUZZER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.replay(path)
