"""Packaging: a source build without a C compiler stops with a message that says what to do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="CC selects the compiler only on Unix")
def test_build_without_a_compiler_fails_clearly(tmp_path: Path) -> None:
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tmp_path / name)
    # Keep a generated _core.c (saves the Cython run) but no built extension.
    ignore = shutil.ignore_patterns("*.so", "*.pyd", "__pycache__")
    shutil.copytree(ROOT / "pigeon", tmp_path / "pigeon", ignore=ignore)
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler")}
    # What a user on a platform without a wheel runs: pip, isolated build environment and all.
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "pigeon-broker: cannot compile its C extension (pigeon._core)" in result.stdout
    assert "needs a C compiler" in result.stdout
    assert not out.exists() or not list(out.iterdir())
