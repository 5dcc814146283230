"""Every test that starts another process carries the ``multiprocess`` marker, so that
``pytest -m 'not slow and not multiprocess'`` really runs only in-process unit tests."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# What starts a process: CLI subprocesses, torchrun / spawn, process pools, DataLoader workers.
SPAWNS = re.compile(r"subprocess\.|Popen\(|mp\.spawn\(|start_processes\(|_torchrun\(|\.Pool\("
                    r"|num_workers=[1-9]")


def _marks(nodes: list[ast.expr]) -> set[str]:
    return {m for n in nodes for m in re.findall(r"pytest\.mark\.(\w+)", ast.unparse(n))}


def unmarked_spawning_tests(source: str) -> list[str]:
    tree = ast.parse(source)
    module_marks: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            module_marks |= _marks([node.value])
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            body = "\n".join(ast.get_source_segment(source, s) or "" for s in node.body)
            marks = module_marks | _marks(node.decorator_list)
            if SPAWNS.search(body) and "multiprocess" not in marks:
                found.append(node.name)
    return found


def test_every_test_that_starts_a_process_is_marked():
    missing = {p.name: unmarked_spawning_tests(p.read_text())
               for p in sorted(TESTS.glob("test_*.py")) if p.name != Path(__file__).name}
    assert {k: v for k, v in missing.items() if v} == {}


def test_the_check_finds_an_unmarked_test_and_accepts_marked_ones():
    source = '''
import pytest, subprocess

def test_plain():
    assert sorted([2, 1]) == [1, 2]

def test_spawns():
    subprocess.run(["true"])

@pytest.mark.multiprocess
def test_marked():
    subprocess.run(["true"])
'''
    assert unmarked_spawning_tests(source) == ["test_spawns"]
    marked_module = "import pytest, subprocess\npytestmark = [pytest.mark.multiprocess]\n" \
                    "def test_a():\n    subprocess.run(['true'])\n"
    assert unmarked_spawning_tests(marked_module) == []
