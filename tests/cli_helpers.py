"""Running the ``mae-bench`` entry point in-process, as a user would from the shell."""

from __future__ import annotations

import sys

import pytest

from mae_bench.cli import main


def run_cli(monkeypatch, capsys, *args):
    """``mae-bench ARGS``: returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mae-bench", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err
