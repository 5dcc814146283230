"""The documentation holds: every relative link of README.md, CONTRIBUTING.md and docs/*.md
resolves (file and heading), the README stays short and shows CI's exact test command and every
command, no table cell is a paragraph, the reference pages name everything their registries
hold, and no source file quotes what one machine measured (those numbers live in results/*.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mae_bench.cli import COMMANDS
from mae_bench.data.catalog import register_builtin
from mae_bench.data.registry import DATASETS
from mae_bench.methods.registry import METHODS
from mae_bench.models.vit import PRESETS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220
TABLE_CELL_MAX_CHARS = 160  # a table cell is a name, a number or a phrase, never a paragraph

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks (a link inside code is not a link)."""
    return FENCE.sub("", text)


def links(text: str) -> list[str]:
    return LINK.findall(_prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped,
    spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ +(.+)$", _prose(page.read_text()), re.M)}


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in links(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked offline
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            bad.append(f"{target} (no heading #{anchor} in {where.name})")
    return bad


def test_the_link_checker_finds_links_and_catches_broken_ones(tmp_path):
    (tmp_path / "there.md").write_text("# A heading: `with` code\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-heading-with-code) [web](https://x.org)\n"
                    "[gone](missing.md) [bad anchor](there.md#nope) ![img](pic.png)\n"
                    "```\n[in code](also-missing.md)\n```\n")
    assert [b.split(" ")[0] for b in broken_links(page)] == ["missing.md", "there.md#nope"]
    assert slug("Replacing without rewriting: `eval_key` and `--force`") == \
        "replacing-without-rewriting-eval_key-and---force"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert page.exists()
    assert broken_links(page) == []


def test_the_docs_are_linked_from_the_readme():
    readme = links((ROOT / "README.md").read_text())
    for page in PAGES[1:]:
        assert str(page.relative_to(ROOT)) in readme, f"README.md does not link {page.name}"


def test_readme_is_short_and_shows_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# The README's test command:") + 1]
    assert command.startswith("python3 -m venv .venv") and command.endswith("pytest")
    assert f"```bash\n{command}\n```" in readme


def test_readme_tours_every_command():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in COMMANDS if f"**`{name}`**" not in readme
               or f"mae-bench {name} " not in readme]
    assert missing == []


# A path in backticks under one of these folders names a file or folder of the repository.
REPO_PATH = re.compile(r"`((?:mae_bench|baselines|evals|tests|benchmarks|results|configs|docs"
                       r"|\.ci)/[\w./-]*)`")


def named_paths(text: str) -> list[str]:
    """Repository paths a page names in backticks (in prose and code alike), placeholders such
    as ``baselines/NAME.py`` left out."""
    return [p for p in REPO_PATH.findall(text) if not re.search(r"[A-Z]{3,}", p)]


def test_named_paths_are_found():
    assert named_paths("`evals/knn.py`, `baselines/NAME.py`, `mae_bench/data/` and `runs/x`") \
        == ["evals/knn.py", "mae_bench/data/"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_repository_path_exists(page):
    assert [p for p in named_paths(page.read_text()) if not (ROOT / p).exists()] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_table_cell_is_a_paragraph(page):
    cells = [cell.strip() for line in _prose(page.read_text()).splitlines()
             if line.startswith("|") for cell in line.strip("|").split("|")]
    assert [c for c in cells if len(c) > TABLE_CELL_MAX_CHARS] == []


def test_methods_page_names_every_method_and_preset():
    text = (ROOT / "docs" / "methods.md").read_text()
    files = {name: cls.__module__.replace(".", "/") + ".py" for name, cls in METHODS.items()}
    assert [f for f in files.values() if f"`{f}`" not in text] == []
    rows = set(re.findall(r"^\| (\w+) \|", text, re.M))
    assert sorted(set(PRESETS) - rows) == []


def test_the_method_example_is_the_real_code():
    """docs/methods.md shows SimCLR's class as the pattern of a method: it must be the file's
    code, character for character, so the how-to cannot drift from the contract."""
    text = (ROOT / "docs" / "methods.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class SimCLR(" in b)
    assert block in (ROOT / "baselines" / "simclr.py").read_text()


def test_data_page_names_every_data_set():
    register_builtin()
    text = (ROOT / "docs" / "data.md").read_text()
    assert [name for name in DATASETS if not re.search(rf"\*\*[^*]*\b{name}\b[^*]*\*\*", text)] \
        == []


# Numbers measured on one machine (a CPU model, a core count, a throughput) belong in
# results/*.md, linked from the docstring.
MACHINE_NUMBER = re.compile(r"\b(EPYC|Xeon|Zen ?\d|Sapphire Rapids)\b|\b\d+ cores\b"
                            r"|\d[\d.,]* ?(GFLOP/s|TFLOP/s|img/s)\b")


def test_the_machine_number_pattern_catches_what_it_is_for():
    assert MACHINE_NUMBER.search("1.5x faster on a Zen 5 CPU")
    assert MACHINE_NUMBER.search("76 img/s at batch 256")
    assert MACHINE_NUMBER.search("features, 2 cores: k=200")
    assert not MACHINE_NUMBER.search('f"{ips:.1f} img/s"; see results/speed-cpu.md')


def test_no_source_file_quotes_one_machine():
    quoting = sorted(
        str(path.relative_to(ROOT)) for pkg in ("mae_bench", "baselines", "evals")
        for path in (ROOT / pkg).rglob("*.py") if MACHINE_NUMBER.search(path.read_text()))
    assert quoting == []
