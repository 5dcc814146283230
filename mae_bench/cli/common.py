"""What every command shares: the two consoles, shared options, helpers for parsing lists and
drawing progress, and the one place that turns errors into exit codes (``run``).

Bad input (an unknown name, a missing folder, an invalid value) prints one line starting with
``error:`` and exits with code 2; nothing is written. A run that fails while training (e.g. a
non-finite loss) prints one line and exits with code 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from mae_bench.distributed import leave_process_group
from mae_bench.errors import MaeBenchError, RunInterrupted, TrainingError
from mae_bench.host_memory import keep_freed_memory

try:  # recent typer releases vendor click; older ones use click itself
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException, UsageError

console = Console(stderr=True)  # progress, notes and errors
out = Console()  # results: tables and summaries (rank 0 only under torchrun)

TrustCheckpoint = Annotated[  # one option, shared by the commands that load checkpoints
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow unpickling a checkpoint that is not plain tensors (only for files you trust: "
        "unpickling can run code).",
    ),
]
Progress = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Show progress bars.")
]
Export = Annotated[
    list[Path],
    typer.Option(help="Also write the table to FILE (.md, .csv or .tex; repeatable)."),
]
TABLE_SUFFIXES = (".md", ".csv", ".tex")


def names(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def check_exports(paths: Sequence[Path] | None) -> None:
    """Refuse an --export file of an unknown format before any work is done."""
    for path in paths or []:
        if path.suffix not in TABLE_SUFFIXES:
            raise MaeBenchError(f"--export {path}: unknown table format {path.suffix!r}; "
                                f"valid: {', '.join(TABLE_SUFFIXES)}")


def log_line(line: str) -> None:
    """A progress line of a long command, on stderr, printed as it is (no rich markup)."""
    console.print(line, highlight=False, markup=False)


def main_rank() -> bool:
    """Not a torchrun worker of rank > 0 (those print errors only: rank 0 reports)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def task_progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A context giving a (what, done, total) callback that drives one rich bar per task. The
    bars start with the first report, so an error before any work prints only its line."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars

    if not enabled or not console.is_terminal:
        yield None
        return
    bar = Bars("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               console=console, transient=True)
    tasks: dict[str, int] = {}

    def report(what: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    try:
        yield report
    finally:
        if tasks:
            bar.stop()


def run(app: typer.Typer) -> None:
    """Run the app as the console script does: user errors exit 2 with one line, training
    failures 1, a signal 128 + its number."""
    out.quiet = not main_rank()  # results and summaries: once per torchrun job, from rank 0
    _one_line_warnings()
    try:
        keep_freed_memory()  # before the first step: every step after reuses warm pages
        code = app(standalone_mode=False)
    except UsageError as exc:  # a mistyped option or value, found by the parser
        if not exc.format_message().strip():  # bare `mae-bench`: the help was shown
            sys.exit(0)
        name = exc.ctx.command_path if exc.ctx is not None else "mae-bench"
        _error("error: ", f"{exc.format_message()} (see '{name} --help')")
        sys.exit(2)
    except ClickException as exc:
        _error("error: ", exc.format_message())
        sys.exit(exc.exit_code)
    except MaeBenchError as exc:
        _error("error: ", str(exc))
        sys.exit(2)
    except TrainingError as exc:
        _error("training stopped: ", str(exc))
        sys.exit(1)
    except RunInterrupted as exc:  # SIGTERM / SIGINT: checkpoint saved at a step boundary
        _error("stopped: ", str(exc))
        sys.exit(128 + exc.signum)  # 143 for SIGTERM, 130 for SIGINT, as the shell reports
    except (KeyboardInterrupt, typer.Abort):
        console.print("interrupted")
        sys.exit(130)
    finally:
        leave_process_group()  # a torchrun job's processes end their group cleanly
    sys.exit(code if isinstance(code, int) else 0)


def _one_line_warnings() -> None:
    """mae-bench's own warnings (a torn line in a store, ...) as one ``warning:`` line, not
    Python's "file:line: UserWarning" with a source path; other packages' keep theirs."""
    import warnings

    package = str(Path(__file__).resolve().parents[1])
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(package):
            _error("warning: ", str(message))
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _error(label: str, message: str) -> None:
    console.print(Text.assemble((label, "bold red"), message), soft_wrap=True)
