"""``mae-bench sweep KNOB``: pretrain and evaluate every (value, seed) point of one knob.

Each point is one run folder, ``runs_dir/KNOB-DATASET-ARCH/KNOB=VALUE-seedS-DIGEST`` (the digest
covers every setting, so a changed setting never reuses a run made with another), and its rows
in the results store carry ``sweep`` (the knob's name), the knob's column, the seed, and the
pretraining cost (``gflops_per_image``, ``pretrain_gflops``).

Resuming: a point whose rows are all in the store (``ok`` or ``failed``) is skipped, so re-running
a sweep never duplicates rows; a half-trained run resumes from its checkpoint and a protocol
already evaluated is not evaluated again. ``retry_failed`` runs failed points again (their old
``failed`` rows stay in the append-only store; the report counts a failure only when no later
``ok`` row exists for the same run, protocol and metric).

Failures: a point that raises (a non-finite loss, a damaged checkpoint, out of memory) gets one
``failed`` row per missing protocol, with the error, and the sweep goes on. Bad input (an unknown
knob, a value out of range, a setting the model cannot build) is found before anything runs.

Every finished point attempt appends one line to ``results_dir/sweeps.jsonl`` (the manifest the
report reads: run folder, command, versions), through the store's own locked, all-or-nothing
appender. A point whose rows are complete but whose line is missing (the sweep was killed between
the two) gets its line on the re-run. A store that cannot be written (a full disk) ends the sweep
with one error; the point it stopped at has no rows (appends are all or none), so a re-run
evaluates it again.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from evals.protocols import get_protocol, headline
from mae_bench.app.campaign import Campaign, Todo, run_campaign
from mae_bench.app.compare import (
    REFERENCES,
    at_headline,
    column_label,
    read_json,
    read_store,
    run_finished,
    silent,
    takes_pixels,
)
from mae_bench.app.evaluation import (
    FOLDER_DATASETS,
    PROTOCOLS,
    EvalSpec,
    source_of,
    validate_spec,
)
from mae_bench.app.pretraining import failure_rows
from mae_bench.app.sweep_knobs import SweepKnob, check_method_has, get_knob
from mae_bench.config import RunConfig, validate
from mae_bench.data import load_dataset
from mae_bench.errors import ConfigError, StoreWriteError
from mae_bench.files import (
    MANIFEST_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    append_whole,
    write_json_atomic,
)
from mae_bench.methods.registry import build_method, resolve_config
from mae_bench.results import append_rows, check_writable, git_sha
from mae_bench.training.distributed import (
    broadcast_from_main,
    is_main_process,
    join_process_group,
    local_only,
)
from mae_bench.training.runtime import resolve_device

MANIFEST = MANIFEST_FILE  # kept: tests and callers import it by this name
COST_FILE = "sweep.json"
# The paper's grids (He et al. 2021, Fig. 5 and Table 1), used when --values is not given.
DEFAULT_VALUES = {
    "mask-ratio": "0.1,0.25,0.5,0.75,0.9",
    "decoder-depth": "1,2,4,8",
    "decoder-dim": "64,128,256",
    "mask-strategy": "random,block,grid",
    "norm-pix-loss": "true,false",
    "encoder-mask-tokens": "false,true",
    "method": "mae,simclr,mocov3,byol,dino",
}
Log = Callable[[str], None]


@dataclass(frozen=True)
class SweepSpec:
    """One sweep, as the user asked for it (built once at the edge, by the CLI)."""

    knob: str
    values: tuple[str, ...] = ()  # as typed; empty: the knob's DEFAULT_VALUES
    seeds: tuple[int, ...] = (0,)
    protocols: tuple[str, ...] = ("knn", "linear")
    method: str = "mae"
    dataset: str = "digits"
    data_dir: str | None = None
    arch: str = "vit_mini_patch2"
    img_size: int | None = None
    epochs: float = 5.0  # every point's pretraining length (unless the knob is epochs)
    batch_size: int | None = None
    k: int = 20
    label_fraction: float = 0.1  # fewshot only
    pool: str = "cls"
    device: str = "auto"
    precision: str = "auto"
    num_workers: int | None = None
    runs_dir: str = "runs/sweeps"
    results_dir: str = "results"
    cache_dir: str | None = None
    use_cache: bool = True
    retry_failed: bool = False
    references: bool = True  # also evaluate the random encoder (per seed) and pixels (once)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # more config (YAML)
    command: str = ""  # the command line, for the manifest and the report


@dataclass(frozen=True)
class SweepPoint:
    value: Any
    seed: int
    cfg: RunConfig
    run_dir: Path


@dataclass(frozen=True)
class PointState:
    point: SweepPoint
    done: tuple[str, ...]  # protocols with rows in the store
    failed: tuple[str, ...]  # ... of which only failed rows
    trained: bool  # the run folder holds a finished run
    complete: bool  # every protocol has rows

    @property
    def status(self) -> str:
        if self.complete:
            return "failed" if self.failed else "done"
        return "partly evaluated" if self.done else "trained" if self.trained else "to do"


@dataclass
class SweepOutcome:
    states: list[PointState]  # as found before this call ran anything
    ran: list[str]  # "value/seed" of points this call trained or evaluated
    failed: list[str]  # ... of which failed, with the error
    seconds: float


# --- planning --------------------------------------------------------------------------------


def knob_values(spec: SweepSpec) -> tuple[SweepKnob, list[Any]]:
    """The knob and its parsed values. Raises ConfigError on a bad name or value."""
    knob = get_knob(spec.knob)
    raw = spec.values or tuple(DEFAULT_VALUES.get(knob.name, "").split(","))
    raw = tuple(v.strip() for v in raw if v.strip())
    if not raw:
        raise ConfigError(f"sweep {knob.name} needs --values (e.g. --values 5,10,20)")
    values = [knob.parse(v) for v in raw]
    if len(set(values)) != len(values):
        raise ConfigError(f"--values lists a value twice: {','.join(raw)}")
    return knob, values


def validate_sweep(spec: SweepSpec) -> tuple[SweepKnob, list[Any]]:
    """Checks that need nothing loaded. Raises ConfigError naming the bad value and the fix."""
    knob, values = knob_values(spec)
    if not spec.seeds:
        raise ConfigError("--seeds needs at least one seed")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"--seeds lists a seed twice: {','.join(map(str, spec.seeds))}")
    check_method_has(knob, spec.method)
    if not spec.protocols:
        raise ConfigError("--protocols needs at least one protocol")
    if len(set(spec.protocols)) != len(spec.protocols):
        raise ConfigError(f"--protocols lists a protocol twice: {','.join(spec.protocols)}")
    for protocol in spec.protocols:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol '{protocol}'; valid: {', '.join(PROTOCOLS)}")
        validate_spec(_eval_spec(spec, protocol, Path("run"), {}))
    if spec.k < 1:
        raise ConfigError(f"--k must be >= 1, got {spec.k}")
    if spec.epochs <= 0:
        raise ConfigError(f"--epochs must be > 0, got {spec.epochs:g}")
    return knob, values


def plan_points(spec: SweepSpec) -> list[SweepPoint]:
    """Every (value, seed) point, its full config and run folder, values outermost.

    Each point's model is built once (a few ms for small presets) so that a value the model
    cannot take (a mask ratio that leaves no patch visible, a decoder width its heads do not
    divide, an image size the patch does not divide) is an error before anything runs.

    Raises:
        ConfigError / DataError: bad input (nothing is written).
    """
    knob, values = validate_sweep(spec)
    info = load_dataset(spec.dataset, "train", spec.data_dir).info  # fails early on bad data
    base = RunConfig.from_dict(spec.overrides) if spec.overrides else RunConfig()
    base = base.replace(
        model={"arch": spec.arch, "img_size": spec.img_size},
        data={"dataset": spec.dataset, "data_dir": spec.data_dir,
              "num_workers": spec.num_workers},
        train={"method": spec.method, "epochs": spec.epochs, "batch_size": spec.batch_size,
               "device": spec.device, "precision": spec.precision},
    )
    group = Path(spec.runs_dir) / f"{knob.name}-{spec.dataset}-{spec.arch}"
    points = []
    for raw in values:
        cfg = base.replace(**knob.assign(raw))
        value = knob.label(raw)  # what names, rows and the report show
        validate(cfg)
        cfg = resolve_config(cfg)
        try:
            build_method(cfg, info.channels, cfg.model.img_size or info.img_size)
        except ConfigError as err:
            raise ConfigError(f"{knob.name}={_fmt(value)}: {err}") from None
        except (AssertionError, ValueError, RuntimeError) as err:  # e.g. heads not dividing dim
            raise ConfigError(f"{knob.name}={_fmt(value)} cannot be built with --arch "
                              f"{spec.arch}: {str(err).splitlines()[0] if str(err) else err!r}"
                              ) from None
        for seed in spec.seeds:
            seeded = cfg.replace(train={"seed": seed})
            name = f"{knob.name}={_fmt(value)}-seed{seed}-{seeded.digest()[:8]}"
            points.append(SweepPoint(value, seed, seeded, group / name))
    check_writable(spec.results_dir)  # last: a store that cannot be written, before any work
    return points


def point_states(spec: SweepSpec, points: list[SweepPoint]) -> list[PointState]:
    """What the store and the run folders already hold for each point."""
    store = read_store(spec.results_dir)
    states = []
    for p in points:
        rows = _rows_of(store, spec, p)
        done = tuple(pr for pr in spec.protocols if pr in set(rows["protocol"]))
        ok = set(rows.loc[rows["status"] == "ok", "protocol"]) if len(rows) else set()
        failed = tuple(pr for pr in done if pr not in ok)
        states.append(PointState(p, done, failed, run_finished(p.run_dir),
                                 complete=len(done) == len(spec.protocols)))
    return states


# --- running ---------------------------------------------------------------------------------


def run_sweep(spec: SweepSpec, log: Log = print, progress: bool = True, console=None,
              eval_progress=None) -> SweepOutcome:
    """Run every point that is not already in the store; record failures and go on."""
    start = time.perf_counter()
    git_sha()  # the commit this process started from, for every row and manifest line
    points = plan_points(spec)
    knob = get_knob(spec.knob)
    join_process_group(resolve_device(spec.device))  # torchrun: every rank runs this function
    if not is_main_process():  # rank 0 logs, records failures and writes the manifest
        log = silent
    # Rank 0 reads the store and the run folders; every rank follows its plan.
    states = broadcast_from_main(point_states(spec, points) if is_main_process() else None)
    campaign = _Points(spec, knob, log)
    done = run_campaign(campaign, states, log=log, progress=progress, console=console,
                        eval_progress=eval_progress)
    if spec.references:
        _run_references(spec, knob, log, eval_progress)
    return SweepOutcome(states, campaign.ran, done.failed, time.perf_counter() - start)


class _Points(Campaign[PointState]):
    """The sweep's points: a complete one is skipped (its missing manifest line written), the
    others pretrain and evaluate the protocols they lack; any failure of a point is recorded
    (failed rows, a manifest line) and the sweep goes on, but for a store that cannot be
    written, which stops it."""

    recoverable = (Exception,)

    def __init__(self, spec: SweepSpec, knob: SweepKnob, log: Log) -> None:
        self.spec, self.knob, self.log = spec, knob, log
        self.main = is_main_process()
        self.listed = _manifest_runs(Path(spec.results_dir) / MANIFEST) if self.main else set()
        self.ran: list[str] = []  # "value/seed" of the points this call trained or evaluated
        self.todo: dict[Path, list[str]] = {}  # the protocols each started point evaluates

    def label(self, run: PointState) -> str:
        return f"{self.knob.name}={_fmt(run.point.value)} seed {run.point.seed}"

    def start(self, index: int, total: int, run: PointState) -> Todo | None:
        spec, p, label = self.spec, run.point, self.label(run)
        retry = spec.retry_failed and run.failed
        if run.complete and not retry:
            note = ""
            if self.main and p.run_dir.name not in self.listed:
                _repair_manifest(spec, self.knob, run)
                note = f" (its {MANIFEST} line was missing: written now)"
            self.log(f"[{index}/{total}] {label}: {run.status}, skipped{note}")
            return None
        todo = self.todo[p.run_dir] = [pr for pr in spec.protocols if pr not in run.done
                                       or (retry and pr in run.failed)]
        self.log(f"[{index}/{total}] {label}: {', '.join(todo)} in {p.run_dir}")
        self.ran.append(f"{_fmt(p.value)}/{p.seed}")
        finished = broadcast_from_main(run_finished(p.run_dir) if self.main else None)
        return Todo(None if finished else p.cfg, p.run_dir)  # a finished run is reused

    def evaluations(self, run: PointState) -> Iterable[tuple[str, EvalSpec]]:
        extra = _point_fields(self.knob, run.point)
        for protocol in self.todo[run.point.run_dir]:
            yield f"  evaluating {protocol}", _eval_spec(self.spec, protocol, run.point.run_dir,
                                                         extra)

    def failed(self, run: PointState, err: BaseException) -> str:
        spec, p, label = self.spec, run.point, self.label(run)
        if isinstance(err, StoreWriteError):  # not the point's fault: stop here
            raise StoreWriteError(err.store, err.reason, _stopped_at(label)) from None
        message = _one_line(err)
        self.log(f"  failed: {message}")
        if self.main:
            ok = set(_rows_of(read_store(spec.results_dir), spec, p, ok_only=True)["protocol"])
            remaining = [pr for pr in self.todo[p.run_dir] if pr not in ok]
            with _store_writes(spec, label):
                _record_failure(spec, self.knob, p, remaining, message)
                _append_manifest(spec, self.knob, p, "failed", message)
        return message

    def succeeded(self, run: PointState) -> None:
        if self.main:
            with _store_writes(self.spec, self.label(run)):
                _append_manifest(self.spec, self.knob, run.point, "ok", None)


def _stopped_at(label: str) -> str:
    return (f"the sweep stopped at {label}: re-run it once the store can be written "
            "(finished points are skipped)")


@contextmanager
def _store_writes(spec: SweepSpec, label: str) -> Iterator[None]:
    """A store or manifest write that fails (a full disk) ends the sweep with one error line,
    not a traceback; the append wrote nothing, so the re-run sees the point as not done."""
    try:
        yield
    except OSError as exc:
        raise StoreWriteError(spec.results_dir, exc.strerror or exc, _stopped_at(label)) from None


def _point_fields(knob: SweepKnob, p: SweepPoint) -> dict[str, Any]:
    """The extra fields the rows of a trained point carry: the sweep, the knob's value (where
    the rows do not carry it already) and the pretraining cost (measured once, by rank 0)."""
    cost = broadcast_from_main(_point_cost(p) if is_main_process() else None)
    extra: dict[str, Any] = {"sweep": knob.name, "gflops_per_image": cost["gflops_per_image"],
                             "pretrain_gflops": cost["pretrain_gflops"]}
    if knob.column not in ("mask_ratio", "mask_strategy", "norm_pix_loss", "pretrain_epochs",
                           "method"):  # the rows carry those already
        extra[knob.column] = p.value
    return extra


def _point_cost(p: SweepPoint) -> dict[str, Any]:
    """The run's pretraining cost: recorded in its folder, or measured now (one process) and
    recorded there."""
    from mae_bench.app.speed import measure_training

    cost = read_json(p.run_dir / COST_FILE)
    if "gflops_per_image" not in cost:
        with local_only():  # under torchrun rank 0 measures alone while the others wait
            speed = measure_training(p.cfg, steps=1, warmup=0)
        summary = read_json(p.run_dir / SUMMARY_FILE)
        t = p.cfg.train
        # the global batch (all torchrun processes), as the run recorded it
        batch = read_json(p.run_dir / RUN_FILE).get("effective_batch",
                                                      t.batch_size * t.accum_iter)
        images = int(summary["total_steps"]) * int(batch)
        cost = {"gflops_per_image": float(f"{speed.gflops_per_image:.4g}"),
                "pretrain_images": images,
                "pretrain_gflops": float(f"{speed.gflops_per_image * images:.4g}")}
        write_json_atomic(p.run_dir / COST_FILE, cost)
    return cost


def _record_failure(spec: SweepSpec, knob: SweepKnob, p: SweepPoint, protocols: list[str],
                    message: str) -> None:
    """One failed row per protocol the point is left without (the rows' one writer)."""
    fields: dict[str, Any] = {"sweep": knob.name}
    if knob.column != "method":  # the rows' method column holds it
        fields[knob.column] = p.value
    if protocols:
        append_rows(spec.results_dir, failure_rows(p.cfg, p.run_dir, message,
                                                   protocols=protocols, fields=fields))


def sweep_summary(spec: SweepSpec, points: list[SweepPoint]) -> pd.DataFrame:
    """Top-1 per value (rows) and protocol (columns, k-NN at ``spec.k``) over the sweep's seeds:
    cells "mean ± std (n)", the shape a terminal shows; ``mae-bench report`` gives the rest."""
    from mae_bench.results import aggregate

    store = read_store(spec.results_dir)
    names = {p.run_dir.name: _fmt(p.value) for p in points}
    if store.empty or "checkpoint" not in store:
        return pd.DataFrame()
    rows = store[store["checkpoint"].isin(list(names)) & (store["metric"] == "top1")
                 & (store["dataset"] == spec.dataset)]
    rows = at_headline(rows, spec.k)
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(value_of_knob=rows["checkpoint"].map(names))
    rows = pd.concat([rows, _reference_rows(store, spec)])
    stats = aggregate(rows, by=["value_of_knob", "protocol"])
    table = {}
    for r in stats.to_dict("records"):
        label = column_label(r["protocol"], headline(r["protocol"], k=spec.k))
        std = "-" if r["n"] < 2 else f"{r['std']:.2f}"
        cell = f"{r['mean']:.2f} ± {std} ({r['n']})" if r["n"] else "failed"
        table.setdefault(r["value_of_knob"], {})[label] = cell
    order = list(dict.fromkeys([*names.values(), *rows["value_of_knob"]]))  # references last
    return pd.DataFrame.from_dict(table, orient="index").reindex(
        [v for v in order if v in table]).rename_axis(spec.knob)


# --- references ------------------------------------------------------------------------------

def _reference_rows(store: pd.DataFrame, spec: SweepSpec) -> pd.DataFrame:
    """The store's top-1 reference rows of this sweep (k-NN at ``spec.k``), labelled for its
    table."""
    from mae_bench.app.report import REFERENCE_LABELS

    if "sweep" not in store or "method" not in store:
        return store.iloc[:0]
    rows = store[(store["sweep"] == get_knob(spec.knob).name) & (store["metric"] == "top1")
                 & store["method"].isin(list(REFERENCE_LABELS))
                 & (store["dataset"] == spec.dataset)
                 & ((store["arch"] == spec.arch) | (store["method"] == "pixels"))]
    rows = at_headline(rows, spec.k)
    return rows.assign(value_of_knob=rows["method"].map(REFERENCE_LABELS))


def reference_specs(spec: SweepSpec, knob: SweepKnob) -> list[EvalSpec]:
    """The reference evaluations of a sweep, made as ``compare`` makes them: a randomly
    initialised encoder of the sweep's architecture (once per seed, so that it gets an interval
    like the points) and raw pixels (once; frozen protocols only), on the same data with the
    same protocols. Their rows carry the sweep's name: its table and report show them beside
    the knob's values."""
    out = []
    for name in REFERENCES:
        for seed in spec.seeds if name == "random" else spec.seeds[:1]:
            for protocol in spec.protocols:
                if name == "pixels" and not takes_pixels(protocol):
                    continue
                base = _eval_spec(spec, protocol, Path(name), {"sweep": knob.name})
                out.append(replace(base, checkpoint=name, seed=seed,
                                   arch=spec.arch if name == "random" else None,
                                   img_size=spec.img_size if name == "random" else None))
    return out


def _run_references(spec: SweepSpec, knob: SweepKnob, log: Log, eval_progress) -> None:
    """Evaluate the references the store does not hold yet (after the points: a reference
    that fails writes no row and stops the sweep; the re-run, skipping the points, tries it
    again)."""
    todo = None
    if is_main_process():
        store = read_store(spec.results_dir)
        todo = [e for e in reference_specs(spec, knob) if not _has_reference(store, spec, e)]
    run_campaign(_References(), broadcast_from_main(todo), log=log,
                 eval_progress=eval_progress)


class _References(Campaign[EvalSpec]):
    """The reference evaluations: nothing to train, no failure survived."""

    def label(self, run: EvalSpec) -> str:
        return run.checkpoint

    def start(self, index: int, total: int, run: EvalSpec) -> Todo:
        return Todo()

    def evaluations(self, run: EvalSpec) -> Iterable[tuple[str, EvalSpec]]:
        yield f"reference {run.checkpoint} (seed {run.seed}): evaluating {run.protocol}", run


def _has_reference(store: pd.DataFrame, spec: SweepSpec, e: EvalSpec) -> bool:
    """Whether the store holds ok rows of this reference evaluation for this sweep."""
    if store.empty or "sweep" not in store:
        return False
    sel = store[(store["run_id"] == source_of(e).run_id) & (store["sweep"] == e.extra["sweep"])
                & (store["dataset"] == spec.dataset) & (store["protocol"] == e.protocol)
                & (store["status"] == "ok")]
    if "pool" in sel and e.checkpoint != "pixels":
        sel = sel[sel["pool"].isna() | (sel["pool"] == spec.pool)]
    if spec.dataset in FOLDER_DATASETS and spec.data_dir and "data_dir" in sel:
        sel = sel[sel["data_dir"] == str(Path(spec.data_dir).resolve())]
    return len(sel) > 0


# --- the manifest ----------------------------------------------------------------------------


def versions(device: str = "") -> dict[str, str]:
    """Library and platform versions for the manifest (what produced the numbers)."""
    import numpy
    import torch

    import mae_bench
    from mae_bench.training.runtime import cpu_has_fast_bf16, device_name

    # platform.processor() is empty on Linux: the CPU model comes from /proc/cpuinfo, with
    # whether it has bf16 matrix instructions (without them bf16 is emulated, and slow).
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "mae_bench": getattr(mae_bench, "__version__", "?"),
            "platform": platform.platform(), "processor": device_name(torch.device("cpu")),
            "cpu_bf16": "yes" if cpu_has_fast_bf16() else "no (emulated)",
            "device": device or ("cuda" if torch.cuda.is_available() else "cpu")}


def _append_manifest(spec: SweepSpec, knob: SweepKnob, p: SweepPoint, status: str,
                     error: str | None) -> None:
    summary = read_json(p.run_dir / SUMMARY_FILE)
    device = " ".join(str(summary[k]) for k in ("device", "precision") if k in summary)
    line = {"sweep": knob.name, "column": knob.column, "value": p.value, "seed": p.seed,
            "run_id": p.run_dir.name, "run_dir": str(p.run_dir.resolve()),
            "method": p.cfg.train.method, "arch": p.cfg.model.arch, "dataset": spec.dataset,
            "status": status, "error": error, "command": spec.command,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_sha": git_sha(), "versions": versions(device)}
    path = Path(spec.results_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    append_whole(path, (json.dumps(line, sort_keys=True) + "\n").encode())


def _repair_manifest(spec: SweepSpec, knob: SweepKnob, state: PointState) -> None:
    """Write the manifest line of a point whose rows are all in the store but which has none
    (the sweep was killed between its rows and its line)."""
    p = state.point
    error = None
    if state.failed:
        rows = _rows_of(read_store(spec.results_dir), spec, p)
        errors = rows.loc[rows["status"] == "failed"].get("error", pd.Series(dtype=object))
        error = next((str(e) for e in errors.tolist() if isinstance(e, str) and e), None)
    with _store_writes(spec, f"{knob.name}={_fmt(p.value)} seed {p.seed}"):
        _append_manifest(spec, knob, p, "failed" if state.failed else "ok", error)


def _manifest_runs(path: Path) -> set[str]:
    """The run ids the manifest has a line for (unreadable lines are skipped)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return set()
    runs = set()
    for line in raw.splitlines():
        try:
            entry = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("run_id"), str):
            runs.add(entry["run_id"])
    return runs


# --- helpers ---------------------------------------------------------------------------------


def _eval_spec(spec: SweepSpec, protocol: str, run_dir: Path, extra: dict[str, Any]
               ) -> EvalSpec:
    return EvalSpec(protocol=protocol, checkpoint=str(run_dir), dataset=spec.dataset,
                    data_dir=spec.data_dir, pool=spec.pool,
                    label_fraction=(spec.label_fraction if get_protocol(protocol).few_shot
                                    else 1.0),
                    device=spec.device, precision=spec.precision, cache_dir=spec.cache_dir,
                    use_cache=spec.use_cache, results_dir=spec.results_dir, extra=extra)


def _rows_of(store: pd.DataFrame, spec: SweepSpec, p: SweepPoint, ok_only: bool = False
             ) -> pd.DataFrame:
    """The store's rows of one point (matched by run folder name, data set and pool)."""
    if store.empty or "checkpoint" not in store:
        return pd.DataFrame({"protocol": [], "status": []})
    sel = store[(store["checkpoint"] == p.run_dir.name) & (store["dataset"] == spec.dataset)]
    if "pool" in sel:
        sel = sel[sel["pool"].isna() | (sel["pool"] == spec.pool)]
    if ok_only:
        sel = sel[sel["status"] == "ok"]
    return sel


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() \
        if isinstance(value, bool) else str(value)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
