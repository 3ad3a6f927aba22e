"""The layout the README draws, read from the code's own imports: model.py imports only torch and the standard
library; engine/ never imports a script (train.py, sample.py, tools/, prepare/, bench/); and no module of ours
imports another in a circle."""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train", "sample"}


def our_modules() -> dict[str, str]:
    """Dotted module name -> path, for every Python file of ours outside tests/ (prepare/ modules by bare name, as
    the prepare scripts import them)."""
    found = {}
    for folder in ("", "engine", "tools", "prepare", "bench"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py") and name != "__init__.py":
                stem = name[:-3]
                found[f"{folder}.{stem}" if folder and folder != "prepare" else stem] = os.path.join(ROOT, folder, name)
    return found


def imports_of(path: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # from engine import data
    return names


def graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(path) & set(modules) for name, path in modules.items()}


def test_model_imports_only_torch_and_the_standard_library():
    tops = {name.split(".")[0] for name in imports_of(os.path.join(ROOT, "model.py"))}
    assert tops - sys.stdlib_module_names == {"torch"}


def test_engine_never_imports_a_script():
    for name, deps in graph().items():
        if name.startswith("engine."):
            scripts = {d for d in deps if d in SCRIPTS or d.startswith(("tools.", "bench.")) or "." not in d}
            assert scripts <= {"model"}, f"{name} imports {sorted(scripts - {'model'})}"


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(edges[name]):
            assert state.get(dep) != 1, "import circle: " + " -> ".join([*path, name, dep])
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])
    assert len(edges) > 20  # the walk saw the whole tree, not an empty one
