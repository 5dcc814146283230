"""The ``mae-bench`` command line: parse, validate, call the application (``mae_bench.app``),
render with rich.

One module per command; this file creates the app and registers every command, in the order
``mae-bench --help`` lists them. The command modules never import this one (no cycle): what they
share is in ``common`` (consoles, shared options, errors -> exit codes) and ``config_options``
(the options generated from the run config).
"""

from __future__ import annotations

from typing import Annotated

import typer

from mae_bench.cli import (
    compare,
    datasets,
    export,
    pretrain,
    report,
    reproduce,
    results,
    shard,
    speed,
    sweep,
    visualize,
)
from mae_bench.cli import eval as evaluate
from mae_bench.cli.common import Command, Group, run, show_version

app = typer.Typer(
    name="mae-bench",
    cls=Group,
    help="Benchmark self-supervised ViT representations: pretrain MAE and contrastive / "
    "self-distillation baselines (SimCLR, MoCo v3, BYOL, DINO) on one shared ViT, evaluate, "
    "compare. Runs on a laptop CPU or GPUs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMANDS = {
    "pretrain": pretrain.pretrain,
    "datasets": datasets.datasets,
    "shard": shard.shard,
    "visualize": visualize.visualize,
    "eval": evaluate.eval_,
    "export": export.export,
    "compare": compare.compare,
    "results": results.results,
    "sweep": sweep.sweep,
    "reproduce": reproduce.reproduce,
    "report": report.report,
    "speed": speed.speed,
}
for _name, _command in COMMANDS.items():
    app.command(name=_name, cls=Command)(_command)


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=show_version,
                           help="Print the version and exit.")
    ] = False,
) -> None:
    """The group's own options (the commands have theirs)."""


def main() -> None:
    """Console-script entry point (``mae-bench``, ``python -m mae_bench``): user errors exit 2
    with one line, training failures 1."""
    run(app)
