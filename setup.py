"""Builds the Cython core. Metadata lives in pyproject.toml.

PIGEON_SANITIZE=1 in the environment builds the core with AddressSanitizer and
UndefinedBehaviorSanitizer (see docs/operations.md).
"""

import ast
import os
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

NO_COMPILER = """
pigeon-broker: cannot compile its C extension (pigeon._core): {error}

There is no prebuilt wheel of pigeon-broker for this platform and Python, so pip
is building it from source, which needs a C compiler and the Python headers.
Pigeon has no pure-Python fallback: the broker core is C.

  - Debian/Ubuntu: apt-get install gcc python3-dev
  - Fedora/RHEL:   dnf install gcc python3-devel
  - Alpine:        apk add gcc musl-dev python3-dev
  - macOS:         xcode-select --install
  - Windows:       install "Microsoft C++ Build Tools"

or run the single-file server binary instead (docs/operations.md).
"""


class BuildExt(build_ext):
    """``build_ext`` that turns a missing or failing C compiler into one clear message."""

    def run(self) -> None:
        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError) as exc:
            sys.stderr.write(NO_COMPILER.format(error=exc))
            raise SystemExit(1) from exc


compile_args = ["-O2"]
link_args: list[str] = []
sanitizers = []
if os.environ.get("PIGEON_SANITIZE") == "1":
    sanitizers.append("address,undefined")
    # -O1 keeps stack traces readable; any UB report is fatal, not a warning
    compile_args = ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
for sanitizer in sanitizers:
    compile_args.append(f"-fsanitize={sanitizer}")
    link_args.append(f"-fsanitize={sanitizer}")


def protocol_constant(name: str) -> int:
    """A constant of pigeon/protocol.py, where the wire constants are defined once for Python and C."""
    tree = ast.parse(Path("pigeon/protocol.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == [name]:
            return int(ast.literal_eval(node.value))
    raise LookupError(f"{name} is not defined in pigeon/protocol.py")


TOPIC_MAX = protocol_constant("TOPIC_MAX")
# the parts the core and replication's walks both cimport
SHARED_PARTS = ["pigeon/_crc32c.pxd", "pigeon/_little_endian.pxd"]

extensions = [
    Extension(
        "pigeon._core",
        ["pigeon/_core.pyx"],
        define_macros=[("PIGEON_TOPIC_MAX", str(TOPIC_MAX))],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        depends=[str(part) for part in Path("pigeon/core").iterdir()] + SHARED_PARTS,
    ),
    *(
        # replication's walks over log records (pigeon/cluster/replication.py), a topic's slot, and
        # the router's scan of a client's input
        Extension(
            f"pigeon.cluster.{name}",
            [f"pigeon/cluster/{name}.pyx"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            depends=["pigeon/cluster/_records.pxd", "pigeon/cluster/_slot.pxd", *SHARED_PARTS],
        )
        for name in ("_split", "_index", "_slot", "_scan")
    ),
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}),
    cmdclass={"build_ext": BuildExt},
)
