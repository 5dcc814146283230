"""``mae-bench eval``: one protocol on an encoder (or precomputed features); a table, and one
result row per number.

Its options are generated from ``EvalSpec``'s fields (``mae_bench/cli/config_options.py``): the
encoder, data and run options of ``EvalTarget`` and every registered protocol's knobs, with the
help, names and defaults their fields carry. ``--set PROTOCOL.KNOB=VALUE`` sets any knob too.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.table import Table

from mae_bench.app.eval_spec import EvalSpec
from mae_bench.cli.common import (
    Progress,
    close_progress,
    console,
    main_rank,
    out,
    task_progress,
)
from mae_bench.cli.config_options import with_field_options
from mae_bench.errors import ConfigError

if TYPE_CHECKING:
    from mae_bench.app.evaluation import EvalOutcome

_FIELDS = {f.name: f for f in dataclasses.fields(EvalSpec)}

SetKnob = Annotated[
    list[str],
    typer.Option(
        "--set", metavar="PROTOCOL.KNOB=VALUE",
        help="Set any knob of a protocol, e.g. --set finetune.mixup=0.8 --set "
        "knn.temperature=0.1 (repeatable; the protocol must be the one run). VALUE is a YAML "
        "scalar (5, 1e-3, true, null); the knobs are the protocols' options, with underscores."),
]


@with_field_options(list(_FIELDS.values()))
def eval_(set_: SetKnob = None, progress: Progress = True, **options: Any) -> None:
    """Evaluate an encoder (or precomputed features) with one protocol; print a table and append
    one row per number to the results store."""
    from mae_bench.app import evaluation  # torch and the protocols' code: only when run

    spec = spec_from_options(options, set_ or [])

    def show(outcome: EvalOutcome) -> None:  # before the rows are written: never lost
        close_progress(report)  # erased first: a live bar would be redrawn into the table
        for note in outcome.notes:
            console.print(note, highlight=False)
        out.print(_rows_table(outcome.rows))

    with task_progress(progress and main_rank()) as report:
        outcome = evaluation.run_eval(spec, report, show=show)  # looked up now: tests stub it
    if not main_rank():  # rank 0 holds the numbers and reports them
        return
    if outcome.skipped:
        out.print(outcome.skipped, highlight=False, soft_wrap=True)  # one line
        return
    out.print(f"{len(outcome.rows)} rows appended to {outcome.results_file} "
              f"({outcome.seconds:.1f} s)")


def spec_from_options(options: dict[str, Any], sets: list[str]) -> Any:
    """The EvalSpec of the command line: each option converted to its field's form (paths as
    strings, ``--k 10,20`` as a tuple), then every ``--set``."""
    values: dict[str, Any] = {}
    for name, value in options.items():
        parse = _FIELDS[name].metadata.get("parse")
        if parse is not None and value is not None:
            value = parse(value)
        values[name] = str(value) if isinstance(value, Path) else value
    for text in sets:
        name, value = _assignment(text, values["protocol"])
        default = _FIELDS[name].default
        if values.get(name, default) not in (default, value):
            raise ConfigError(f"{name} is given twice (its option and --set {text}); give it "
                              "once")
        values[name] = value
    values["command"] = shlex.join(["mae-bench", *sys.argv[1:]])
    return EvalSpec(**values)


def _assignment(text: str, protocol: str) -> tuple[str, Any]:
    """``finetune.mixup=0.8`` -> ("mixup", 0.8), for a knob of the protocol that runs."""
    from evals.protocols import get_protocol

    key, sep, raw = text.partition("=")
    name, dot, knob = key.strip().partition(".")
    if not sep or not dot:
        raise ConfigError(f"--set {text}: expected PROTOCOL.KNOB=VALUE, e.g. "
                          "--set finetune.mixup=0.8")
    if name != protocol:
        raise ConfigError(f"--set {text}: {name} is not the protocol run (--protocol "
                          f"{protocol}); set {protocol}.KNOB")
    knobs = [f.name for f in dataclasses.fields(get_protocol(protocol).Options)]
    if knob not in knobs:
        raise ConfigError(f"--set {text}: {protocol} has no knob {knob!r}; valid: "
                          f"{', '.join(knobs)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text}: VALUE must be a YAML scalar") from None
    parse = _FIELDS[knob].metadata.get("parse")
    return knob, parse(value) if parse is not None and value is not None else value


def _rows_table(rows: list[dict]) -> Table:
    first = rows[0]
    title = (f"{first['protocol']}: {first['method']} {first['arch']} "
             f"({first['checkpoint']}) on {first['dataset']}")
    table = Table(title=title)
    knobs = [k for k in ("k", "temperature", "pool", "probe", "label_fraction", "init", "blocks",
                         "epochs", "map_r_cap") if any(k in r for r in rows)]
    for col in ("metric", *knobs, "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for r in rows:
        table.add_row(r["metric"], *(str(r.get(k, "")) for k in knobs), f"{r['value']:.2f}")
    return table
