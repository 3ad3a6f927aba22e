"""The layout the README draws, read from the code's own imports: model.py imports only torch and the standard
library; engine/ never imports a script (train.py, sample.py, tools/, prepare/, bench/); and no module of ours
imports another in a circle."""

import ast
import os
import re
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


def test_no_engine_module_names_train_config():
    """engine/ takes the values it uses, never train.py's TrainConfig, so tools can use engine/ without train.py."""
    for name, path in our_modules().items():
        if name.startswith("engine."):
            source = open(path).read()
            assert not re.search(r"\bTrainConfig\b", source), f"{path} names TrainConfig; pass it the values it uses"


def test_no_script_imports_train_py():
    """train.py is a leaf, as nanoGPT's is: tools that take its command line ask it (engine/configurator.py
    resolve_options), and nothing imports it (tests aside)."""
    importers = sorted(name for name, deps in graph().items() if "train" in deps)
    assert importers == [], f"{', '.join(importers)} import train.py"


def test_train_py_reads_like_nanogpt():
    """TrainConfig first, then main() with its loop, then init_model and estimate_loss; the sizes the restructure of
    issue 28 set: train.py at most about 550 lines, main() about 140 and its loop about 85."""
    path = os.path.join(ROOT, "train.py")
    tree = ast.parse(open(path).read())
    top = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert top[:4] == ["TrainConfig", "main", "init_model", "estimate_loss"]
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    loop = next(n for n in ast.walk(main) if isinstance(n, ast.While))
    assert len(open(path).read().splitlines()) <= 560
    assert main.end_lineno - main.lineno + 1 <= 150 and loop.end_lineno - loop.lineno + 1 <= 95
