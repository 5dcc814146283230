"""What every command shares: the two consoles, shared options, helpers for parsing lists and
drawing progress, and the one place that turns errors into exit codes (``run``).

Bad input (an unknown name, a missing folder, an invalid value) prints one line starting with
``error:`` and exits with code 2; nothing is written. A run that fails while training (e.g. a
non-finite loss) prints one line and exits with code 1.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from mae_bench.errors import MaeBenchError, RunInterrupted, TrainingError
from mae_bench.training.distributed import leave_process_group
from mae_bench.training.host_memory import keep_freed_memory

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


class TaskBars:
    """A (what, done, total) callback that drives one rich bar per task on stderr. The bars
    start with the first report, so an error before any work prints only its line; they are
    transient, and ``close`` erases them before results are printed, so that a table never
    runs into a bar that the terminal redraws."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
        from rich.progress import Progress as Bars
        from rich.table import Column

        from mae_bench.methods.engine import FittedText

        kept = Column(no_wrap=True)  # the counts and the ETA show in full at any width
        self.bars = Bars(FittedText("{task.description}"), BarColumn(),
                         MofNCompleteColumn(table_column=kept),
                         TimeRemainingColumn(table_column=kept), console=console,
                         transient=True)
        self.tasks: dict[str, int] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.bars.live.is_started:
            self.bars.start()
        if what not in self.tasks:
            self.tasks[what] = self.bars.add_task(what, total=total)
        self.bars.update(self.tasks[what], completed=done, total=total)

    def close(self) -> None:
        """Erase the bars (a later report starts them again, with only its new tasks)."""
        if self.bars.live.is_started:
            self.bars.stop()
        for task in self.tasks.values():
            self.bars.remove_task(task)
        self.tasks.clear()


@contextmanager
def task_progress(enabled: bool) -> Iterator[TaskBars | None]:
    """A context giving a ``TaskBars`` callback, or None where no bars are drawn (turned off,
    or stderr is not a terminal)."""
    if not enabled or not console.is_terminal:
        yield None
        return
    bars = TaskBars()
    try:
        yield bars
    finally:
        bars.close()


def close_progress(report: Callable[[str, int, int], None] | None) -> None:
    """Erase the bars of ``task_progress`` (if any) before printing results."""
    if isinstance(report, TaskBars):
        report.close()


def log_between_bars(report: Callable[[str, int, int], None] | None) -> Callable[[str], None]:
    """``log_line`` for a command whose task bars come and go (sweep, compare): a log line
    first erases the finished bars, so that it is never printed among them."""
    def log(line: str) -> None:
        close_progress(report)
        log_line(line)

    return log


class _ReadableHelp:
    """What every command's and the group's help shares (a mixin of typer's classes): help
    texts are plain text, not rich markup (``mae-bench[hf]`` stays as written); single line
    breaks of a docstring are spaces; a flag shows no ``<bool>`` (it takes no value); an
    argument reads ``KNOB`` in the usage line, not ``{knob}``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help = _plain(self.help)
        for param in self.params:
            if getattr(param, "help", None):
                param.help = _plain(param.help)

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:  # --help is made here, after __init__
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # no "<bool>": a flag takes no value
        return params

    def collect_usage_pieces(self, ctx) -> list[str]:
        from typer.core import TyperArgument

        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name or "").upper()
                name = (name if param.required else f"[{name}]") + ("..." if param.nargs != 1
                                                                    else "")
                pieces.append(name)
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        if hasattr(self, "subcommand_metavar"):
            pieces.append(self.subcommand_metavar)
        return pieces


def _plain(text: str | None) -> str | None:
    """Help text as typer's rich mode should show it: markup escaped, and the single line
    breaks of a wrapped docstring joined (paragraphs, split by a blank line, stay)."""
    if not text:
        return text
    from rich.markup import escape

    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(escape(" ".join(p.split("\n"))) for p in paragraphs)


class _Interrupted(BaseException):
    """Ctrl-C inside a command. Typer turns a KeyboardInterrupt into a silent exit 130; this
    one passes through it to ``run``, which says so."""


class Command(_ReadableHelp, TyperCommand):
    """Every mae-bench command (``app.command(cls=Command)``)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted() from None


class Group(_ReadableHelp, TyperGroup):
    """The ``mae-bench`` group (``typer.Typer(cls=Group)``)."""


def show_version(value: bool) -> None:
    """``mae-bench --version``: the version, then exit (an eager option's callback)."""
    if value:
        from mae_bench.version import __version__

        out.print(f"mae-bench {__version__}", highlight=False)
        raise typer.Exit()


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
    except TrainingError as exc:  # a subclass may name its own label (a failed save: "error: ")
        _error(getattr(exc, "label", "training stopped: "), str(exc))
        sys.exit(1)
    except RunInterrupted as exc:  # SIGTERM / SIGINT: checkpoint saved at a step boundary
        _error("stopped: ", str(exc))
        sys.exit(128 + exc.signum)  # 143 for SIGTERM, 130 for SIGINT, as the shell reports
    except (KeyboardInterrupt, _Interrupted, typer.Abort):  # files are replaced whole: none torn
        console.print("interrupted", highlight=False)
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
