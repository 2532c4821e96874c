"""The layering rules of the design card, read from the code's own imports (every `import` and
`from ... import`, at any depth, so an import inside a function counts too):

- the engine (server/engine/) imports no FastAPI and nothing of the server above it;
- only server/api/ imports FastAPI, Starlette or sse-starlette;
- the server never imports training, and training never imports the server;
- contract/ imports neither side;
- only server/cluster/ imports Ray, and its plain parts (catalog, board, forwarding, settings) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEB = ("fastapi", "starlette", "sse_starlette")
# What the engine may use of the server besides itself: the exception classes (a leaf module).
ENGINE_MAY_IMPORT = ("server.engine", "server.errors")


def modules_imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def offending(package: str, rule) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sources(package)
        for name in sorted(modules_imported(path))
        if rule(path, name)
    ]


def _is(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_rules_see_real_imports():
    """Guard against a vacuous pass: the reader finds the imports these rules are about."""
    assert "fastapi" in modules_imported(ROOT / "server/api/app.py")
    assert "server.engine.decoder" in modules_imported(ROOT / "server/engine/runner.py")
    assert sources("server/engine") and sources("training")


def test_the_engine_imports_nothing_above_it():
    assert offending("server/engine", lambda _, name: _is(name, "server") and not _is(name, *ENGINE_MAY_IMPORT)) == []
    assert offending("server/engine", lambda _, name: _is(name, *WEB)) == []


def test_only_the_api_imports_the_web_framework():
    api = ROOT / "server/api"
    assert offending("server", lambda path, name: _is(name, *WEB) and api not in path.parents) == []


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("server", "training"), ("training", "server"), ("contract", "server"), ("contract", "training")],
)
def test_the_sides_stay_apart(package, forbidden):
    assert offending(package, lambda _, name: _is(name, forbidden)) == []


CLUSTER_PLAIN = ("catalog.py", "board.py", "forwarding.py", "settings.py", "__init__.py")


def test_only_the_cluster_imports_ray():
    cluster = ROOT / "server/cluster"
    assert "ray" in modules_imported(cluster / "ingress.py")
    assert offending("server", lambda path, name: _is(name, "ray") and cluster not in path.parents) == []
    assert offending("server/cluster", lambda path, name: _is(name, "ray") and path.name in CLUSTER_PLAIN) == []
