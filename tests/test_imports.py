"""The package's import structure: lazy public names, light client imports, no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

import pigeon

PACKAGE = Path(pigeon.__file__).resolve().parent


def _loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"import sys\n{code}\nprint('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_the_client_side_loads_neither_the_core_nor_the_server() -> None:
    loaded = _loaded_after(
        "import pigeon, pigeon.client, pigeon.errors, pigeon.protocol\n"
        "pigeon.Client, pigeon.AsyncClient, pigeon.Message, pigeon.PigeonError, pigeon.__version__"
    )
    assert "pigeon.client.sync" in loaded
    assert not loaded & {"pigeon._core", "pigeon.server", "pigeon.cli", "pigeon.testing", "aiohttp"}


def test_the_server_loads_neither_the_clients_nor_the_tools() -> None:
    loaded = _loaded_after("import pigeon.server")
    assert "pigeon._core" in loaded
    assert not loaded & {"pigeon.client", "pigeon.cli", "pigeon.bench", "pigeon.testing", "aiohttp"}


def test_the_server_starts_without_what_only_help_and_json_logs_need(tmp_path: Path) -> None:
    # argparse sizes a help formatter to the terminal (importing shutil, bz2, lzma) and JSON log
    # lines need datetime: neither is on the way of a start to listening (benchmarks/recovery.py)
    loaded = _loaded_after(
        "import logging, os, signal\n"
        "from pigeon.cli.server import main\n"
        "class StopWhenListening(logging.Handler):\n"
        "    def emit(self, record):\n"
        "        if ' listening on ' in record.getMessage():\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "logging.getLogger('pigeon').addHandler(StopWhenListening())\n"
        f"assert main(['--port', '0', '--data-dir', {str(tmp_path / 'data')!r}]) == 0\n"
    )
    assert "pigeon.server.store" in loaded
    assert not loaded & {"shutil", "bz2", "lzma", "datetime"}


def test_the_kombu_transport_loads_neither_the_core_nor_the_server() -> None:
    loaded = _loaded_after("import pigeon.kombu; pigeon.kombu.Transport")
    assert "pigeon.kombu.transport" in loaded
    assert not loaded & {"pigeon._core", "pigeon.server", "pigeon.cli", "pigeon.testing"}


def test_the_public_names_resolve() -> None:
    from pigeon import AsyncClient, Client, Message, PigeonError, Server, ServerThread
    from pigeon.client.aio import AsyncClient as DefinedAsyncClient
    from pigeon.client.codec import Message as DefinedMessage
    from pigeon.client.sync import Client as DefinedClient
    from pigeon.errors import PigeonError as DefinedPigeonError
    from pigeon.server.protocol import Server as DefinedServer
    from pigeon.testing import ServerThread as DefinedServerThread

    assert (AsyncClient, Client, Message, PigeonError, Server, ServerThread) == (
        DefinedAsyncClient,
        DefinedClient,
        DefinedMessage,
        DefinedPigeonError,
        DefinedServer,
        DefinedServerThread,
    )
    for name in pigeon.__all__:
        assert getattr(pigeon, name) is not None, name
        assert name in dir(pigeon)
    with pytest.raises(AttributeError, match="no_such_name"):
        pigeon.no_such_name  # noqa: B018


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    """``if TYPE_CHECKING:`` (or ``if typing.TYPE_CHECKING:``)."""
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run: at module level and in functions, not under ``if TYPE_CHECKING``."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _imports(node.orelse)
        else:
            yield from _imports(ast.iter_child_nodes(node))


def _targets(name: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The package's modules an import statement in module ``name`` runs (with their packages' __init__)."""
    if isinstance(node, ast.Import):
        imported = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = name.split(".") if is_package else name.split(".")[:-1]
            anchor = ".".join(here[: len(here) - node.level + 1])
            base = f"{anchor}.{base}" if base else anchor
        # ``from package import submodule`` imports the submodule; ``from module import name`` the module
        imported = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    targets = {module for module in imported if module in modules and module != name}
    for module in imported:
        parts = module.split(".")
        for end in range(1, len(parts)):
            package = ".".join(parts[:end])
            # importing a module runs its packages' __init__, except those the importer is in:
            # they are already being imported when it runs
            if package in modules and package != name and not name.startswith(package + "."):
                targets.add(package)
    return targets


def import_graph() -> dict[str, set[str]]:
    """Which of the package's modules each module imports when it runs."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {t for node in _imports([tree]) for t in _targets(name, is_package, node, set(modules))}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names (first and last the same), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_the_import_graph_sees_the_imports() -> None:
    graph = import_graph()
    assert "pigeon.cli.stats" in graph["pigeon.cli.top"]
    assert "pigeon.server.monitor" in graph["pigeon.cli.server"]  # imported inside a function
    assert "pigeon.server" in graph["pigeon.testing"]  # a package's __init__ runs too
    assert "pigeon.client" not in graph["pigeon.client.aio"]  # but not the importer's own package
    assert "pigeon.client" in graph["pigeon.cli.pubsub"]  # a name from another package's __init__
    assert "pigeon.server" not in graph["pigeon"]  # only under TYPE_CHECKING
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
