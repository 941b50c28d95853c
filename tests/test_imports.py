"""The package's imports form a one-way graph (STYLE.md habit 13) and importing does no work."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deepscope"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """deepscope modules imported at module level (imports inside functions are deliberate late binding)."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("deepscope"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("deepscope"))
    return found


def test_no_import_cycles_between_modules():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {t for t in top_level_imports(p) if t in modules and t != m} for m, p in modules.items()}
    # Package __init__ files re-export their children; a child importing its own package's __init__ is a
    # cycle, but the package importing its children is not.
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if node.startswith(nxt + ".") and modules[nxt].name == "__init__.py":
                continue  # a submodule importing from its parent package's names
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if state.get(nxt) is None:
                visit(nxt, stack + [node])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_import_is_cheap_and_has_no_side_effects(tmp_path):
    code = ("import os, deepscope, torch; "
            "assert not os.path.exists('runs'), 'import created a runs folder'; "
            "assert torch.get_num_threads() > 0")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
