"""``mae-bench reproduce``: run a published recipe (``configs/reference/TABLE.yaml``) and put the
number mae-bench measures beside the published one.

A reference table is one published table that mae-bench has rows of: its source (repository,
file, commit, url), the data set, the protocol as the source states it (lightly: k-NN with
k = 200 and T = 0.1 at the best epoch; solo-learn: a linear classifier on the final encoder), a
tolerance with the reason for it, the run-config settings every row shares (``section.key``)
and one row per method: the published top-1 and the method's own settings. What mae-bench cannot
express of the original recipe is listed under ``differences``, so that a reproduction says how
far its recipe is from the source's, not only how far its number is.

Each row pretrains through the one application entry (``pretraining.pretrain_run``) and is
evaluated through the one evaluation path (``evaluation.run_eval``); nothing here trains. The
engine keeps one checkpoint per run, so for a best-epoch protocol the run is trained in segments
of ``eval_every`` epochs (``max_steps``; a run resumes exactly where it stopped) and evaluated
after each one, as lightly's benchmark evaluates after every epoch. Every evaluation is kept in
the run folder (``reproduce.json``): a stopped reproduction resumes without repeating one. The
selected evaluation's rows go to the results store with the reference fields
(``reference_table``, ``published``, ``tolerance``, ``epochs_run``, ``epochs_published``, ...).

A shorter run (``--epochs``) is allowed and labelled ``shortened`` everywhere; the settings
measured in epochs (warm-up, queue start, frozen prototypes, teacher-temperature warm-up) are
scaled by the same factor, so that the schedules keep their shape. It is a first look, as is a
run on a CPU; the reproduction is the full length on a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mae_bench.app.evaluation import EvalSpec, run_eval, validate_spec
from mae_bench.app.pretraining import PretrainingFailed, pretrain_run
from mae_bench.config import RunConfig, validate
from mae_bench.data import default_data_dir, load_dataset
from mae_bench.errors import ConfigError, DataError
from mae_bench.files import write_json_atomic
from mae_bench.methods.engine import plan_run
from mae_bench.methods.registry import method_class, resolve_config
from mae_bench.results import append_rows, check_writable, make_row, stored_evaluation
from mae_bench.training.distributed import broadcast_from_main, is_main_process, rank_and_world
from mae_bench.training.runtime import resolve_device

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "configs" / "reference"
REPO_ROOT = REFERENCE_DIR.parents[1]  # a table's local data folder is relative to it
EVALS_FILE = "reproduce.json"  # every evaluation of a run folder, by optimizer step
SELECTIONS = ("best-epoch", "final")
# Settings measured in epochs: a shortened run scales them with its length.
EPOCH_KNOBS = ("train.warmup_epochs", "ssl.teacher_temp_warmup_epochs",
               "ssl.freeze_last_layer_epochs", "ssl.queue_start_epochs")
_EVAL_FIELDS = {f.name for f in fields(EvalSpec)}
_OWN_FIELDS = {"protocol", "checkpoint", "dataset", "data_dir", "seed", "device", "precision",
               "results_dir", "use_cache", "cache_dir", "features_dir", "encoder", "extra"}

Log = Callable[[str], None]


@dataclass(frozen=True)
class ReferenceRow:
    """One published number and the settings of the method that made it."""

    method: str  # mae-bench's registry name
    name: str  # as the source prints it
    published: float  # top-1, percent
    overrides: dict[str, Any]  # section.key -> value, over the table's settings
    eval: dict[str, Any]  # this row's protocol options (solo-learn's classifier lr)
    differences: tuple[str, ...]


@dataclass(frozen=True)
class ReferenceTable:
    """A published table as ``configs/reference/NAME.yaml`` records it (see the module doc)."""

    name: str
    title: str
    source: dict[str, str]  # repository, file, commit, url (and code, note)
    dataset: str
    local_data: str | None  # a copy of the data in this workspace, relative to the repository
    data_label: str | None  # how rows on that copy are labelled ("CIFAR-10 JPEG q75")
    protocol: str
    options: dict[str, Any]  # EvalSpec fields of the protocol (k-NN: ks, temperature)
    selection: str  # best-epoch | final
    eval_every: float  # epochs between the evaluations of a best-epoch protocol
    as_published: str  # the protocol in the source's words
    tolerance: float  # points of top-1
    tolerance_why: str
    settings: dict[str, Any]  # section.key -> value, every row
    differences: tuple[str, ...]
    rows: tuple[ReferenceRow, ...]

    @property
    def epochs(self) -> float:
        return float(self.settings["train.epochs"])

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(r.method for r in self.rows)

    def row(self, method: str) -> ReferenceRow:
        for row in self.rows:
            if row.method == method:
                return row
        raise ConfigError(f"--method {method}: {self.name} has no row {method!r}; valid: "
                          f"{', '.join(self.methods)}")


# --- reading the tables ----------------------------------------------------------------------


def table_names() -> list[str]:
    """The reference tables of this checkout (``configs/reference/*.yaml``)."""
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.yaml"))


def load_table(name: str) -> ReferenceTable:
    """The table ``name`` (a file of ``configs/reference/``) or a path to a table's YAML.

    Raises:
        ConfigError: no such table (the message lists the valid ones), or a malformed file.
    """
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        path = REFERENCE_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown reference table {name!r}; valid: "
                              f"{', '.join(table_names()) or f'none in {REFERENCE_DIR}'} "
                              "(or a path to a table's .yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
        return _parse(raw, path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"reference table {path}: not valid YAML: "
                          f"{str(exc).splitlines()[0]}") from None


def _get(raw: Any, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    if key not in raw:
        if default is ...:
            raise ConfigError(f"{where}: missing '{key}'")
        return default
    value = raw[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{where}: '{key}' must be {getattr(kind, '__name__', kind)}, "
                          f"got {value!r}")
    return value


def _parse(raw: Any, path: Path) -> ReferenceTable:
    where = f"reference table {path}"
    number = (int, float)
    source = _get(raw, "source", dict, where)
    for key in ("repository", "file", "commit", "url"):
        _get(source, key, str, f"{where}, source")
    data = _get(raw, "data", dict, where)
    protocol = _get(raw, "protocol", dict, where)
    name = _get(protocol, "name", str, f"{where}, protocol")
    options = dict(_get(protocol, "options", dict, f"{where}, protocol", {}))
    options = _eval_options(options, f"{where}, protocol.options")
    selection = _get(protocol, "selection", str, f"{where}, protocol")
    if selection not in SELECTIONS:
        raise ConfigError(f"{where}: unknown protocol.selection {selection!r}; valid: "
                          f"{', '.join(SELECTIONS)}")
    tolerance = _get(raw, "tolerance", dict, where)
    settings = _get(raw, "settings", dict, where)
    if "train.epochs" not in settings:
        raise ConfigError(f"{where}: settings must give train.epochs (the published length)")
    rows = []
    for i, r in enumerate(_get(raw, "rows", list, where)):
        at = f"{where}, rows[{i}]"
        rows.append(ReferenceRow(
            method=_get(r, "method", str, at), name=_get(r, "name", str, at),
            published=float(_get(r, "published", number, at)),
            overrides=dict(_get(r, "overrides", dict, at, {})),
            eval=_eval_options(dict(_get(r, "eval", dict, at, {})), f"{at}.eval"),
            differences=tuple(_get(r, "differences", list, at, []))))
    if not rows or len({r.method for r in rows}) != len(rows):
        raise ConfigError(f"{where}: needs rows, one per method")
    return ReferenceTable(
        name=_get(raw, "table", str, where), title=_get(raw, "title", str, where),
        source={k: str(v) for k, v in source.items()},
        dataset=_get(data, "dataset", str, f"{where}, data"),
        local_data=_get(data, "local", str, f"{where}, data", None),
        data_label=_get(data, "label", str, f"{where}, data", None),
        protocol=name, options=options, selection=selection,
        eval_every=float(_get(protocol, "eval_every", number, f"{where}, protocol", 1)),
        as_published=_get(protocol, "as_published", str, f"{where}, protocol"),
        tolerance=float(_get(tolerance, "points", number, f"{where}, tolerance")),
        tolerance_why=_get(tolerance, "why", str, f"{where}, tolerance"),
        settings=dict(settings), differences=tuple(_get(raw, "differences", list, where, [])),
        rows=tuple(rows))


def _eval_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """A table's protocol options as EvalSpec fields (``k: 200`` -> ``ks: (200,)``)."""
    options = {("ks" if k == "k" else k): ((int(v),) if k == "k" else v)
               for k, v in options.items()}
    bad = sorted(set(options) - (_EVAL_FIELDS - _OWN_FIELDS))
    if bad:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(bad)}; valid: k, "
                          f"{', '.join(sorted(_EVAL_FIELDS - _OWN_FIELDS - {'ks'}))}")
    return options


# --- what a reproduction runs ----------------------------------------------------------------


def run_config(table: ReferenceTable, row: ReferenceRow, *, epochs: float | None = None,
               data_dir: str | None = None, seed: int = 0, device: str = "auto",
               precision: str = "auto") -> RunConfig:
    """The resolved pretraining config of ``row``: the table's settings, the row's, the method's
    defaults for the rest; ``epochs`` shortens it and scales the ``EPOCH_KNOBS`` with it.

    Raises:
        ConfigError: an unknown method or knob, a value of the wrong type or out of range.
    """
    values = {**table.settings, **row.overrides, "train.method": row.method,
              "data.dataset": table.dataset}
    if epochs is not None:
        values["train.epochs"] = float(epochs)
    cfg = RunConfig().override(values).replace(
        data={"data_dir": data_dir}, train={"seed": seed, "device": device,
                                            "precision": precision})
    cfg = resolve_config(cfg)
    factor = cfg.train.epochs / table.epochs
    if factor != 1:
        scaled = {}
        for knob in EPOCH_KNOBS:
            section, key = knob.split(".")
            value = getattr(getattr(cfg, section), key)
            if value:  # None or 0: nothing to scale
                scaled[knob] = round(value * factor, 6)
        cfg = cfg.override(scaled)
    validate(cfg)
    return cfg


def eval_steps(steps_per_epoch: int, total_steps: int, selection: str,
               every_epochs: float) -> list[int]:
    """The optimizer steps after which a run is evaluated: every ``every_epochs`` epochs and at
    the end for a best-epoch protocol, only at the end for a final one."""
    if selection == "final":
        return [total_steps]
    every = max(1, round(every_epochs * steps_per_epoch))
    return list(range(every, total_steps, every)) + [total_steps]


@dataclass(frozen=True)
class ReproduceSpec:
    """One reproduction as the user asked for it (built once, by the CLI)."""

    table: str
    methods: tuple[str, ...] = ()  # () = every row of the table
    epochs: float | None = None  # None = the published length
    eval_every: float | None = None  # None = the table's
    data_dir: str | None = None
    out: str = "runs/reproduce"
    results_dir: str = "results"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    cache_dir: str | None = None


@dataclass(frozen=True)
class Plan:
    """A checked reproduction: the table, the rows to run with their configs, the data."""

    table: ReferenceTable
    runs: tuple[tuple[ReferenceRow, RunConfig], ...]
    data_dir: str | None
    data_label: str
    eval_every: float


def plan_reproduce(spec: ReproduceSpec) -> Plan:
    """Check everything that can fail on user input, before any work or write.

    Raises:
        ConfigError: unknown table or method (listing the valid ones), bad --epochs, a bad
            setting in the table. DataError: the table's data set is not here.
    """
    table = load_table(spec.table)
    rows = [table.row(m) for m in spec.methods] if spec.methods else list(table.rows)
    if spec.epochs is not None and not 0 < spec.epochs <= table.epochs:
        raise ConfigError(f"--epochs must be > 0 and at most the published {table.epochs:g} "
                          f"({table.name}); got {spec.epochs:g}")
    every = spec.eval_every if spec.eval_every is not None else table.eval_every
    if every <= 0:
        raise ConfigError(f"--eval-every must be > 0 epochs, got {every:g}")
    for row in rows:
        method_class(row.method)  # unknown method: one line listing the registered ones
    data_dir, label = _data(table, spec.data_dir)
    runs = tuple((row, run_config(table, row, epochs=spec.epochs, data_dir=data_dir,
                                  seed=spec.seed, device=spec.device,
                                  precision=spec.precision)) for row in rows)
    for row, cfg in runs:
        validate_spec(_eval_spec(table, row, Path(spec.out), cfg, spec))
    try:
        for split in ("train", "test"):
            load_dataset(table.dataset, split, data_dir)
    except DataError as exc:
        raise DataError(f"{table.name} needs {table.dataset}, which is not here: {exc}") from None
    return Plan(table, runs, data_dir, label, every)


def _data(table: ReferenceTable, given: str | None) -> tuple[str | None, str]:
    """The data folder (given; else the data set's default folder; else the table's local copy)
    and the label every row of it carries."""
    local = (REPO_ROOT / table.local_data).resolve() if table.local_data else None
    data_dir = given
    if given is None and local is not None and local.is_dir():
        default = default_data_dir(table.dataset)
        if default is None or not default.exists():
            data_dir = str(local)
    if local is not None and data_dir is not None and Path(data_dir).resolve() == local:
        return data_dir, table.data_label or table.dataset
    return data_dir, table.dataset + (f" ({data_dir})" if data_dir else "")


def _eval_spec(table: ReferenceTable, row: ReferenceRow, run_dir: Path, cfg: RunConfig,
               spec: ReproduceSpec) -> EvalSpec:
    # Intermediate encoders are evaluated once: their features are not worth a cache entry.
    return EvalSpec(protocol=table.protocol, checkpoint=str(run_dir), dataset=table.dataset,
                    data_dir=cfg.data.data_dir, seed=spec.seed, device=spec.device,
                    precision=spec.precision, results_dir=None, use_cache=False,
                    cache_dir=spec.cache_dir, **{**table.options, **row.eval})


# --- running ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reproduced:
    """One row of the printed table."""

    method: str
    name: str
    published: float
    measured: float | None  # None: the run failed
    tolerance: float
    epochs_run: float
    epochs_published: float
    selection: str  # which evaluation the number is, in words
    data: str
    run_dir: Path
    error: str | None = None

    @property
    def shortened(self) -> bool:
        return self.epochs_run < self.epochs_published

    @property
    def delta(self) -> float | None:
        return None if self.measured is None else self.measured - self.published

    @property
    def within(self) -> bool | None:
        """Within the tolerance; None where it does not apply (shortened, failed)."""
        if self.delta is None or self.shortened:
            return None
        return abs(self.delta) <= self.tolerance


@dataclass
class ReproduceOutcome:
    table: ReferenceTable
    rows: list[Reproduced]
    device: str
    results_file: Path
    notes: list[str] = field(default_factory=list)


def run_reproduce(spec: ReproduceSpec, log: Log = print, progress: bool = True, console=None,
                  eval_progress=None) -> ReproduceOutcome:
    """Pretrain and evaluate every asked row of the table; append the selected rows."""
    plan = plan_reproduce(spec)
    if is_main_process():
        check_writable(spec.results_dir)
    table = plan.table
    n_train = len(load_dataset(table.dataset, "train", plan.data_dir))
    outcome = ReproduceOutcome(table, [], str(resolve_device(spec.device)),
                               Path(spec.results_dir) / "results.jsonl")
    for index, (row, cfg) in enumerate(plan.runs, 1):
        run_dir = (Path(spec.out) / table.name
                   / f"{row.method}-{cfg.train.epochs:g}ep-{cfg.digest()[:8]}")
        log(f"[{index}/{len(plan.runs)}] {row.name} ({row.method}): {cfg.train.epochs:g} of "
            f"{table.epochs:g} epochs in {run_dir}")
        try:
            done = _train_and_evaluate(spec, plan, row, cfg, run_dir, n_train, log, progress,
                                       console, eval_progress)
        except PretrainingFailed as err:
            log(f"  {row.method} failed: {err}")
            outcome.rows.append(Reproduced(row.method, row.name, row.published, None,
                                           table.tolerance, cfg.train.epochs, table.epochs, "-",
                                           plan.data_label, run_dir, str(err.error)))
            continue
        outcome.rows.append(_record(spec, plan, row, cfg, run_dir, done, outcome.notes))
    return outcome


def _train_and_evaluate(spec: ReproduceSpec, plan: Plan, row: ReferenceRow, cfg: RunConfig,
                        run_dir: Path, n_train: int, log: Log, progress: bool, console,
                        eval_progress) -> dict[str, dict[str, Any]]:
    """Train to each evaluation point and evaluate there; {step: {epoch, rows}}."""
    steps = plan_run(cfg, n_train, rank_and_world()[1])
    points = eval_steps(steps.steps_per_epoch, steps.total_steps, plan.table.selection,
                        plan.eval_every)
    done: dict[str, dict[str, Any]] = broadcast_from_main(
        _read_evals(run_dir) if is_main_process() else None)
    reached = max((int(step) for step in done), default=0)
    for point in points:
        if point <= reached:  # evaluated, or the run had passed it (it keeps one checkpoint)
            continue
        result = pretrain_run(cfg, run_dir, results_dir=spec.results_dir, max_steps=point,
                              progress=progress, console=console)
        epoch = cfg.train.epochs * result.step / steps.total_steps  # as the rows count it
        log(f"  evaluating {row.method} at epoch {epoch:.4g}: {plan.table.protocol}")
        rows = run_eval(_eval_spec(plan.table, row, run_dir, cfg, spec), eval_progress).rows
        done[str(result.step)] = {"epoch": round(epoch, 4), "rows": rows}
        reached = result.step
        if is_main_process():
            write_json_atomic(run_dir / EVALS_FILE, done)
    return done


def _read_evals(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = run_dir / EVALS_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:  # a torn file: evaluate again
        return {}


def is_headline(row: dict[str, Any], options: dict[str, Any]) -> bool:
    """Whether a result row is the number the table publishes: top-1 (k-NN: at its k)."""
    return row.get("metric") == "top1" and ("ks" not in options
                                            or row.get("k") == options["ks"][0])


def headline(rows: list[dict[str, Any]], options: dict[str, Any]) -> float | None:
    """The top-1 an evaluation's rows give for the table; None when they have none."""
    return next((float(r["value"]) for r in rows if is_headline(r, options)), None)


def _record(spec: ReproduceSpec, plan: Plan, row: ReferenceRow, cfg: RunConfig, run_dir: Path,
            done: dict[str, dict[str, Any]], notes: list[str]) -> Reproduced:
    """Select the evaluation the protocol reports, append its rows with the reference fields."""
    table = plan.table
    if not is_main_process():  # under torchrun rank 0 holds the numbers, selects and records
        return Reproduced(row.method, row.name, row.published, None, table.tolerance,
                          cfg.train.epochs, table.epochs, "-", plan.data_label, run_dir)
    options = {**table.options, **row.eval}
    scored = [(headline(e["rows"], options), int(step), e) for step, e in done.items()]
    scored = [s for s in scored if s[0] is not None]
    if table.selection == "final":
        value, _, chosen = max(scored, key=lambda s: s[1])
        selection = f"final, epoch {chosen['epoch']:g}"
    else:
        value, _, chosen = max(scored, key=lambda s: (s[0], -s[1]))  # earliest of a tie
        selection = f"best of {len(scored)}, epoch {chosen['epoch']:g}"
    result = Reproduced(row.method, row.name, row.published, value, table.tolerance,
                        cfg.train.epochs, table.epochs, selection, plan.data_label, run_dir)
    common = {"reference_table": table.name,
              "reference_source": f"{table.source['repository']}@{table.source['commit'][:12]}",
              "epochs_run": cfg.train.epochs, "epochs_published": table.epochs,
              "shortened": result.shortened, "selection": table.selection,
              "selected_epoch": chosen["epoch"], "evaluations": len(scored),
              "data_label": plan.data_label}
    headline_fields = {"published": row.published, "tolerance": table.tolerance}
    if result.within is not None:
        headline_fields["within_tolerance"] = result.within
    rows = [make_row(**(r | common | (headline_fields if is_headline(r, options) else {})))
            for r in chosen["rows"]]
    key = rows[0].get("eval_key")
    stored = stored_evaluation(spec.results_dir, key) if key else None
    if stored is not None and "reference_table" in stored and (
            stored["reference_table"] == table.name).any():
        notes.append(f"{row.method}: its rows are already in {spec.results_dir}")
    else:
        append_rows(spec.results_dir, rows)
    return result
