"""The import graph of mae_bench, baselines and evals: no cycles, no upward imports, and every
module's layer read from the folder it lies in. Every import statement counts, also those inside
functions. Layers, lowest first:

    core         mae_bench/models/ (ViT, attention, masking, MaskedAutoencoder),
                 mae_bench/data/ (formats, augmentation, loaders), mae_bench/training/ (device,
                 precision, the TrainStep, checkpoints, torchrun), mae_bench/results/ (the store,
                 tables), and the root files config.py, errors.py, files.py, version.py
    methods      mae_bench/methods/ (the Method contract, the registry, the pretraining loop),
                 baselines/
    protocols    evals/
    application  mae_bench/app/, mae_bench/cli/, mae_bench/__main__.py and the package root
                 mae_bench/__init__.py (the public facade, mae_bench.evaluate)

A module may import its own layer or those below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mae_bench", "baselines", "evals")
LAYERS = ("core", "methods", "protocols", "application")


# Each folder's layer; a module's layer is its folder's. The root of mae_bench holds only the
# files named here (a new module goes into the folder of its layer).
FOLDERS = {
    "mae_bench.models": "core", "mae_bench.data": "core", "mae_bench.training": "core",
    "mae_bench.results": "core", "mae_bench.methods": "methods", "baselines": "methods",
    "evals": "protocols", "mae_bench.app": "application", "mae_bench.cli": "application",
}
ROOT_FILES = {"mae_bench.config": "core", "mae_bench.errors": "core", "mae_bench.files": "core",
              "mae_bench.version": "core", "mae_bench.__main__": "application",
              "mae_bench": "application"}


def layer_of(module: str) -> str:
    if module in ROOT_FILES:
        return ROOT_FILES[module]
    for folder, layer in FOLDERS.items():
        if module == folder or module.startswith(folder + "."):
            return layer
    raise KeyError(f"{module} lies in no layer's folder: move it into one of {sorted(FOLDERS)}")


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules that ``module`` imports (the deepest known name of each import)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
            elif name == module:
                out.add(name)  # a module importing itself (its own package) is a cycle
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imported(m, p, known) for m, p in known.items()}


def test_the_walker_sees_every_package_and_some_imports(graph):
    assert {m.split(".")[0] for m in graph} == set(PACKAGES)
    assert "mae_bench.config" in graph["mae_bench.training.runtime"]
    # an import inside a function counts too
    assert "mae_bench.methods.registry" in graph["mae_bench.methods.engine"]
    assert sum(len(v) for v in graph.values()) > 100


def test_no_module_imports_a_layer_above_it(graph):
    upward = [f"{m} ({layer_of(m)}) -> {d} ({layer_of(d)})"
              for m, deps in graph.items() for d in sorted(deps)
              if LAYERS.index(layer_of(d)) > LAYERS.index(layer_of(m))]
    assert upward == []


def test_no_import_cycles(graph):
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []


def test_the_checker_catches_a_cycle_and_an_upward_import(tmp_path):
    """The walker itself: a planted cycle and a planted upward import are found."""
    (tmp_path / "a.py").write_text("def f():\n    from b import g\n")
    (tmp_path / "b.py").write_text("import a\n")
    known = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    g = {m: imported(m, p, known) for m, p in known.items()}
    assert g == {"a": {"b"}, "b": {"a"}}
    assert layer_of("evals.knn") == "protocols" and layer_of("mae_bench.models.vit") == "core"
    assert LAYERS.index(layer_of("mae_bench.app.compare")) > LAYERS.index(layer_of("evals.knn"))


def test_every_module_lies_in_a_layers_folder(graph):
    """The folders show the layers: no module outside them (a stray one at the root of
    mae_bench fails here, naming the folders to choose from)."""
    stray = []
    for m in graph:
        try:
            layer_of(m)
        except KeyError as err:
            stray.append(str(err))
    assert stray == []
    with pytest.raises(KeyError, match="lies in no layer's folder"):
        layer_of("mae_bench.vit")
