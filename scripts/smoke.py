"""Run the smoke subset of tests/ against an installed Pigeon, not the source tree.

The tests are copied to a temporary directory first, so ``import pigeon`` (in
the tests and in the ``python -m pigeon`` server they start) finds the installed
package. ``--server`` runs them against another server command instead, such as
the single-file binary. Used by scripts/build-dist.sh and cibuildwheel's
test-command; extra arguments go to pytest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pigeon.testing import SERVER_CMD_ENV

TESTS = Path(__file__).resolve().parents[1] / "tests"


def main() -> int:
    """Copy tests/ away, run ``pytest -m smoke`` there, return pytest's exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", metavar="COMMAND", help="shell-quoted command that starts the server")
    args, pytest_args = parser.parse_known_args()
    env = dict(os.environ)
    if args.server:
        env[SERVER_CMD_ENV] = args.server
    with tempfile.TemporaryDirectory(prefix="pigeon-smoke-") as work:
        shutil.copytree(TESTS, Path(work) / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        command = [sys.executable, "-m", "pytest", "-m", "smoke", "-q", "-p", "no:cacheprovider", "tests"]
        return subprocess.call([*command, *pytest_args], cwd=work, env=env)


if __name__ == "__main__":
    sys.exit(main())
