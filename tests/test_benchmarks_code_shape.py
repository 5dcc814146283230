"""benchmarks/code_shape.py: the measures issue 29's before/after table is made of."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "code_shape.py"
_spec = importlib.util.spec_from_file_location("code_shape", _PATH)
code_shape = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(code_shape)

SNIPPET = '''
def f(protocol, kind):
    """A docstring
    of two lines."""
    if protocol == "knn":
        return 1
    if kind in ("run", "official"):
        return 2
    return "knn"
'''


def test_function_body_leaves_out_the_docstring():
    fn = ast.parse(SNIPPET).body[0]
    assert code_shape.body_lines(fn) == 5


def test_branches_on_strings_are_counted_not_other_uses():
    tree = ast.parse(SNIPPET)
    assert code_shape.string_branches(tree, code_shape.PROTOCOLS) == 1  # not the return
    assert code_shape.string_branches(tree, code_shape.SOURCE_KINDS) == 1


def test_measure_reads_a_tree(tmp_path):
    (tmp_path / "mae_bench" / "cli").mkdir(parents=True)
    (tmp_path / "mae_bench" / "cli" / "eval.py").write_text("def eval_(a, b, *, c=1):\n    pass\n")
    (tmp_path / "README.md").write_text("one\ntwo\n")
    m = code_shape.measure(tmp_path)
    assert (m["eval_params"], m["readme_lines"]) == (3, 2)
    assert m["files"] == [(2, "mae_bench/cli/eval.py")]
