"""The shape of the code, measured: what issue 29 ("protocols as objects, folders that show the
layers") promises to change, before and after.

    python benchmarks/code_shape.py            # a Markdown table on stdout

It reads the source with ``ast`` (nothing is imported) and prints: the longest functions (their
bodies without the docstring, and whole with the signature), the eight longest files, the
parameter count of ``mae-bench eval``, the places that branch on a protocol or source kind by its
string, and the README's length.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mae_bench", "baselines", "evals")
PROTOCOLS = frozenset(("knn", "linear", "fewshot", "finetune", "partial-finetune", "mae-linear",
                       "fast-linear"))
SOURCE_KINDS = frozenset(("run", "official", "outside", "pixels", "random", "timm", "hf", "hub",
                          "python", "features", "object"))


def sources(root: Path) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body without its docstring."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                             ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return 0
    return body[-1].end_lineno - body[0].lineno + 1


def _strings(node: ast.AST) -> set[str]:
    """The string constants a comparison operand names (one constant, or a tuple/list/set)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant)
                and isinstance(e.value, str)}
    return set()


def string_branches(tree: ast.AST, names: frozenset[str]) -> int:
    """Comparisons (==, !=, in, not in) against string constants from ``names``."""
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_strings(o) & names for o in operands):
                count += 1
    return count


def measure(root: Path) -> dict:
    functions, whole, files = [], [], []
    protocol_places = kind_places = 0
    eval_params = None
    for path in sources(root):
        text = path.read_text()
        tree = ast.parse(text)
        rel = path.relative_to(root).as_posix()
        files.append((len(text.splitlines()), rel))
        protocol_places += string_branches(tree, PROTOCOLS)
        kind_places += string_branches(tree, SOURCE_KINDS)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((body_lines(node), f"{rel}:{node.name}"))
                whole.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
                if rel == "mae_bench/cli/eval.py" and node.name in ("eval_", "eval"):
                    a = node.args
                    eval_params = len(a.args) + len(a.kwonlyargs)
    readme = root / "README.md"
    return {"functions": sorted(functions, reverse=True)[:5],
            "whole": sorted(whole, reverse=True)[:3],
            "files": sorted(files, reverse=True)[:8], "eval_params": eval_params,
            "protocol_places": protocol_places, "kind_places": kind_places,
            "readme_lines": len(readme.read_text().splitlines()) if readme.is_file() else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="a checkout (default: this one)")
    m = measure(parser.parse_args().root)
    print("| measure | value |\n|---|---|")
    for n, name in m["functions"]:
        print(f"| function body (lines, no docstring) | {n} `{name}` |")
    for n, name in m["whole"]:
        print(f"| function, signature included (lines) | {n} `{name}` |")
    for n, name in m["files"]:
        print(f"| file (lines) | {n} `{name}` |")
    print(f"| `mae-bench eval` parameters | {m['eval_params']} |")
    print(f"| comparisons with a protocol name string | {m['protocol_places']} |")
    print(f"| comparisons with a source-kind string | {m['kind_places']} |")
    print(f"| README.md lines | {m['readme_lines']} |")


if __name__ == "__main__":
    main()
