"""The house: every module imports as `prefixfleet.…`, and no module of ours takes part in an import
circle — counting imports inside functions and under TYPE_CHECKING, where circles like to hide."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("workers", "registry", "pipelines")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return "prefixfleet." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for room in ROOMS for p in (ROOT / room).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules this file names in any import statement, anywhere in it. `from package import
    name` counts the submodule when `name` is one, else the package itself."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_module_of_ours_is_in_an_import_circle() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle_hidden_in_a_function(tmp_path: Path) -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    hidden = tmp_path / "m.py"
    hidden.write_text("def f():\n    from prefixfleet.registry import keys\n")
    assert _imports(hidden, {"prefixfleet.registry": hidden, "prefixfleet.registry.keys": hidden}) \
        == {"prefixfleet.registry.keys"}


def test_the_artifact_format_is_defined_once() -> None:
    defining = sorted(name for name, path in _modules().items() if '"prefixfleet/1"' in path.read_text())
    assert defining == ["prefixfleet.workers.artifact_format"]


def _test_files() -> list[Path]:
    return sorted((ROOT / "tests").rglob("*.py"))


def test_no_test_imports_a_conftest() -> None:
    """Fixtures come from conftest by name; helpers live in tests/fixtures or *_support modules."""
    offenders = []
    for path in _test_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[-1] == "conftest"]
    assert offenders == []


def test_ray_and_tiny_backbones_are_started_and_built_in_one_place() -> None:
    """One session-scoped Ray for the suite (whoever started it decided its teardown before) and
    one tiny-backbone builder."""
    def files_calling(name: str) -> list[str]:
        return [str(p.relative_to(ROOT)) for p in _test_files()
                if any(isinstance(n, ast.Call) and ast.unparse(n.func) == name for n in ast.walk(ast.parse(p.read_text())))]

    assert files_calling("ray.init") == ["tests/conftest.py"]
    assert files_calling("build_backbone") == ["tests/fixtures/backbones.py"]


def test_no_bare_room_import_even_inside_a_string() -> None:
    """ruff bans bare `import registry`; this also catches one in code handed to `python -c`."""
    bare = re.compile(rf"^\s*(?:from|import) (?:{'|'.join(ROOMS)})\b", re.MULTILINE)
    sources = [p for folder in (*ROOMS, "tests", "benchmarks", "infra") for p in (ROOT / folder).rglob("*.py")]
    offenders = []
    for path in sources:
        for text in [path.read_text()] + [n.value for n in ast.walk(ast.parse(path.read_text()))
                                          if isinstance(n, ast.Constant) and isinstance(n.value, str)]:
            offenders += [f"{path.relative_to(ROOT)}: {m.group().strip()}" for m in bare.finditer(text.replace("\\n", "\n"))]
    assert offenders == []
