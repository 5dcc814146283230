"""``mae-bench compare``: pretrain MAE and the baselines, evaluate each with the same protocols,
add the ``pixels`` and ``random`` reference rows, and tabulate accuracy beside cost.

Fairness: every method trains on the same data with the same engine, for either the same number
of epochs (``epochs``) or the same wall-clock budget (``budget_seconds``: each method's steps are
set from its throughput, measured just before; the time actually spent is reported beside it).
By default every method trains the same backbone (``arch``); an entry ``METHOD@ARCH`` puts a
method on its own backbone (MAE on a ViT beside SimCLR on a ResNet-18), and then the cost
columns (seconds, GFLOPs per image) say what each number cost. With several backbones there is
one random-encoder row per backbone (``random@ARCH``).

Nothing is done twice: a run folder that already holds the finished run is reused (budget runs
keep the epoch count they were planned with), and an evaluation whose rows are already in the
results store is not repeated. Run folders are named by method, data, architecture, the plan
and a digest of every other setting, so that changing any setting starts fresh runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from evals.protocols import get_protocol, headline
from mae_bench.app.campaign import Campaign, Todo, run_campaign
from mae_bench.app.evaluation import EvalSpec, source_of, validate_spec
from mae_bench.app.report import OnlineCurve, write_online_curves
from mae_bench.config import RunConfig, validate
from mae_bench.data import load_dataset
from mae_bench.errors import ConfigError, TrainingError
from mae_bench.files import (
    CONFIG_FILE,
    RESULTS_FILE,
    SUMMARY_FILE,
    write_json_atomic,
)
from mae_bench.methods.registry import method_class, resolve_config
from mae_bench.models.backbones import check_arch, is_vit
from mae_bench.results import check_writable, git_sha, read_results
from mae_bench.training.distributed import (
    broadcast_from_main,
    is_main_process,
    join_process_group,
    local_only,
    rank_and_world,
)
from mae_bench.training.runtime import resolve_device

DEFAULT_METHODS = ("mae", "simclr", "mocov3", "byol", "dino")
DEFAULT_BUDGET_SECONDS = 20.0  # per method, when neither epochs nor a budget is given
REFERENCES = ("pixels", "random")
COST_FILE = "compare.json"

Log = Callable[[str], None]


@dataclass(frozen=True)
class CompareSpec:
    """One comparison, as the user asked for it (built once at the edge, by the CLI)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    protocols: tuple[str, ...] = ("knn", "linear")
    dataset: str = "digits"
    data_dir: str | None = None
    arch: str = "vit_mini_patch2"  # the backbone of every entry without its own @ARCH
    img_size: int | None = None
    epochs: float | None = None  # same epochs for every method ...
    budget_seconds: float | None = None  # ... or the same training time (default)
    batch_size: int | None = None
    seed: int = 0
    references: bool = True
    k: int = 20  # the k-NN column of the table
    label_fraction: float = 0.1  # fewshot only
    finetune_epochs: int = 20  # finetune only: a first look, not the paper's 100
    recipe: str = "auto"  # finetune: evals/recipes.py (the random row gets the scratch baseline)
    pool: str | None = None  # frozen features; None: each encoder's own (ViT cls, CNN mean)
    device: str = "auto"
    precision: str = "auto"
    num_workers: int | None = None
    runs_dir: str = "runs/compare"
    results_dir: str = "results"
    cache_dir: str | None = None
    use_cache: bool = True
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # more config (YAML)


@dataclass
class CompareOutcome:
    table: pd.DataFrame  # one row per method / reference
    run_dirs: dict[str, Path]
    trained: list[str]  # methods trained (or resumed) by this call
    evaluated: list[str]  # "method/protocol" evaluated by this call
    seconds: float
    failed: list[str] = field(default_factory=list)  # "method: error" of stopped trainings
    online_figure: Path | None = None  # the runs' online curves, where they have them


def entry(spec: CompareSpec, name: str) -> tuple[str, str]:
    """(method, backbone) of a ``--methods`` entry: ``simclr@resnet18``, or ``simclr`` on
    ``spec.arch``."""
    method, _, arch = name.partition("@")
    return method, arch or spec.arch


def archs(spec: CompareSpec) -> list[str]:
    """The backbones of the comparison, in the order of first use."""
    return list(dict.fromkeys(entry(spec, name)[1] for name in spec.methods))


def references(spec: CompareSpec) -> list[tuple[str, str, str]]:
    """(row name, checkpoint, backbone) of the reference rows: pixels, and one random encoder
    per backbone (named ``random@ARCH`` when there are several)."""
    if not spec.references:
        return []
    backbones = archs(spec)
    randoms = [("random" if len(backbones) == 1 else f"random@{a}", "random", a)
               for a in backbones]
    return [("pixels", "pixels", spec.arch), *randoms]


def validate_compare(spec: CompareSpec) -> None:
    """Checks that need nothing loaded. Raises ConfigError naming the bad value and the fix."""
    if not spec.methods:
        raise ConfigError("--methods needs at least one method")
    for name in spec.methods:
        method, arch = entry(spec, name)
        cls = method_class(method)
        check_arch(arch)
        if cls.needs_vit and not is_vit(arch):
            raise ConfigError(f"--methods {name}: {method} needs a ViT preset, not {arch}; "
                              f"e.g. {method}@vit_mini_patch4")
    if len(set(spec.methods)) != len(spec.methods):
        raise ConfigError(f"--methods lists a method twice: {','.join(spec.methods)}")
    if spec.epochs is not None and spec.budget_seconds is not None:
        raise ConfigError("give --epochs (same epochs for every method) or --budget-minutes "
                          "(same training time), not both")
    if spec.budget_seconds is not None and spec.budget_seconds <= 0:
        raise ConfigError(f"--budget-minutes must be > 0, got {spec.budget_seconds / 60:g}")
    if not spec.protocols:
        raise ConfigError("--protocols needs at least one protocol")
    for protocol in spec.protocols:
        validate_spec(_eval_spec(spec, protocol, "pixels" if takes_pixels(protocol)
                                 else "random"))
    if spec.k < 1:
        raise ConfigError(f"--k must be >= 1, got {spec.k}")


def run_config(spec: CompareSpec, name: str, epochs: float | None = None) -> RunConfig:
    """The pretraining config of one ``--methods`` entry in this comparison (method defaults
    resolved for its backbone)."""
    method, arch = entry(spec, name)
    base = RunConfig.from_dict(spec.overrides) if spec.overrides else RunConfig()
    cfg = base.replace(
        model={"arch": arch, "img_size": spec.img_size},
        data={"dataset": spec.dataset, "data_dir": spec.data_dir,
              "num_workers": spec.num_workers},
        train={"method": method, "epochs": epochs, "batch_size": spec.batch_size,
               "seed": spec.seed, "device": spec.device, "precision": spec.precision},
    )
    validate(cfg)
    return resolve_config(cfg)


def run_dir_for(spec: CompareSpec, cfg: RunConfig) -> Path:
    """runs_dir/METHOD-DATASET-ARCH-PLAN-DIGEST; the digest covers every setting but epochs."""
    plan = (f"{spec.budget_seconds:g}s" if spec.budget_seconds is not None
            else f"{spec.epochs:g}ep")
    digest = cfg.replace(train={"epochs": 1}).digest()[:8]
    t = cfg.train
    return Path(spec.runs_dir) / f"{t.method}-{cfg.data.dataset}-{cfg.model.arch}-{plan}-{digest}"


def run_compare(spec: CompareSpec, log: Log = print, progress: bool = True,
                console=None, eval_progress=None) -> CompareOutcome:
    """Pretrain (or reuse) every method, evaluate (or reuse) every protocol, build the table."""
    start = time.perf_counter()
    git_sha()  # the commit this process started from, for every row
    join_process_group(resolve_device(spec.device))  # torchrun: every rank runs this function
    world = rank_and_world()[1]
    if not is_main_process():
        log = silent
    if spec.epochs is None and spec.budget_seconds is None:
        spec = CompareSpec(**{**spec.__dict__, "budget_seconds": DEFAULT_BUDGET_SECONDS})
    validate_compare(spec)
    # Fail on bad data, or a store that cannot be written, before any training.
    n_train = len(load_dataset(spec.dataset, "train", spec.data_dir))
    plans = {m: run_config(spec, m, spec.epochs) for m in spec.methods}
    for cfg in plans.values():  # e.g. a MoCo v2+ queue longer than the data set
        method_class(cfg.train.method).check_data(cfg, n_train)
    if is_main_process():
        check_writable(spec.results_dir)

    pretrainings = _Pretrainings(spec, plans, n_train, world, log)
    trained = run_campaign(pretrainings, list(plans), log=log, progress=progress,
                           console=console)
    run_dirs, failed = pretrainings.run_dirs, trained.failed
    entries: list[tuple[str, str]] = [(name, str(d)) for name, d in run_dirs.items()]
    entries += [(name, checkpoint) for name, checkpoint, _ in references(spec)]
    # A stopped run stays in the table, with no numbers; it may have no checkpoint to name it.
    stopped = {f.split(":")[0] for f in failed}
    run_ids = {name: Path(checkpoint).name if name in stopped
               else _run_id(spec, checkpoint, _arch_of(spec, name)) for name, checkpoint in entries}
    entries = [(name, checkpoint) for name, checkpoint in entries if name not in stopped]
    todo = broadcast_from_main(_evals_to_run(spec, entries, run_ids) if is_main_process()
                               else None)
    evaluated = run_campaign(_Evaluations(spec, run_dirs), todo, log=log,
                             eval_progress=eval_progress).evaluated
    if not is_main_process():  # rank 0 builds and prints the table
        return CompareOutcome(pd.DataFrame(), run_dirs, trained.trained, evaluated,
                              time.perf_counter() - start, failed)
    table = compare_table(read_store(spec.results_dir), spec, run_ids, run_dirs)
    return CompareOutcome(table, run_dirs, trained.trained, evaluated,
                          time.perf_counter() - start, failed, _online_figure(spec, run_dirs))


def _online_figure(spec: CompareSpec, run_dirs: dict[str, Path]) -> Path | None:
    """``compare-online-<dataset>.png`` in the results folder: every method's online k-NN and
    linear top-1 against epochs and wall time (``report.online_curves``); None when no run has
    an online evaluation."""
    curves = [OnlineCurve(name, i, 0, run_dir) for i, (name, run_dir) in
              enumerate(run_dirs.items())]
    budget = (f"{spec.budget_seconds / 60:g} min each" if spec.budget_seconds is not None
              else f"{spec.epochs:g} epochs each")
    return write_online_curves(curves, f"compare on {spec.dataset} ({budget}): online "
                               "evaluation",
                               Path(spec.results_dir) / f"compare-online-{spec.dataset}.png")


class _Pretrainings(Campaign[str]):
    """compare's first pass: plan (size a budget run from its measured speed), pretrain or
    reuse, and record each method's cost beside its run."""

    recoverable = (TrainingError,)  # e.g. a non-finite loss: recorded, the others go on

    def __init__(self, spec: CompareSpec, plans: dict[str, RunConfig], n_train: int,
                 world: int, log: Log) -> None:
        self.spec, self.plans, self.n_train, self.world, self.log = (spec, plans, n_train,
                                                                     world, log)
        self.failure_store = spec.results_dir
        self.run_dirs: dict[str, Path] = {}
        self.planned: dict[str, tuple[RunConfig, dict[str, Any], bool]] = {}

    def label(self, run: str) -> str:
        return run

    def start(self, index: int, total: int, run: str) -> Todo:
        spec = self.spec
        run_dir = run_dir_for(spec, self.plans[run])
        self.run_dirs[run] = run_dir
        # Under torchrun rank 0 reads the folder, sizes the run and tells the others.
        cfg, cost, done = self.planned[run] = broadcast_from_main(
            _plan_run(spec, self.plans[run], run_dir, self.n_train, self.world)
            if is_main_process() else None)
        what = "reusing the finished run" if done else (
            f"training {epochs_shown(cfg.train.epochs, spec.budget_seconds)} epochs" + (
                f" ({spec.budget_seconds:g} s budget)" if spec.budget_seconds else ""))
        self.log(f"[{index}/{total}] {run}: {what} in {run_dir}")
        # a finished run folder is left exactly as it is (its run.json included)
        return Todo(None if done else cfg, run_dir)

    def failed(self, run: str, err: BaseException) -> str:
        self.log(f"  {run} failed: {err}")
        return str(err)

    def succeeded(self, run: str) -> None:
        if not is_main_process():
            return
        cfg, cost, done = self.planned[run]
        run_dir = self.run_dirs[run]
        if not done or "pretrain_seconds" not in cost:
            summary = json.loads((run_dir / SUMMARY_FILE).read_text())
            cost |= {"pretrain_seconds": round(summary["train_seconds"], 2),
                     "pretrain_img_per_s": round(summary["images_per_second"] or 0.0, 2),
                     "pretrain_epochs": cfg.train.epochs}
        write_json_atomic(run_dir / COST_FILE, cost)


class _Evaluations(Campaign[tuple[str, str, str]]):
    """compare's second pass: each (name, checkpoint, protocol) the store lacks; the rows of a
    trained method carry its GFLOPs per image."""

    def __init__(self, spec: CompareSpec, run_dirs: dict[str, Path]) -> None:
        self.spec, self.run_dirs = spec, run_dirs

    def label(self, run: tuple[str, str, str]) -> str:
        return run[0]

    def start(self, index: int, total: int, run: tuple[str, str, str]) -> Todo:
        return Todo()  # nothing to train

    def evaluations(self, run: tuple[str, str, str]) -> Iterable[tuple[str, EvalSpec]]:
        name, checkpoint, protocol = run
        extra = {}
        if name in self.run_dirs:
            extra = {"gflops_per_image": broadcast_from_main(
                _read_cost(self.run_dirs[name]).get("gflops_per_image") if is_main_process()
                else None)}
        yield f"evaluating {name}: {protocol}", _eval_spec(
            self.spec, protocol, checkpoint, extra, _arch_of(self.spec, name))


def epochs_shown(epochs: float, budget_seconds: float | None) -> str:
    """Epochs as a log line gives them: as asked (``2.5``), or, sized to a time budget, to 3
    significant figures with a ``~`` (``~13.3``: the digits past those mean nothing)."""
    if not budget_seconds:
        return f"{epochs:g}"
    return f"~{epochs:.3g}" if epochs < 1000 else f"~{epochs:.0f}"


def _plan_run(spec: CompareSpec, cfg: RunConfig, run_dir: Path, n_train: int,
              world: int) -> tuple[RunConfig, dict[str, Any], bool]:
    """The run's config (its epochs sized to the budget from a measured throughput, or kept
    from an earlier plan), its recorded costs, and whether it already finished."""
    from mae_bench.app.speed import measure_training

    planned = (run_dir / CONFIG_FILE).is_file()
    if planned:  # trained (or started) before: keep the epochs it was planned with
        saved = RunConfig.from_yaml(run_dir / CONFIG_FILE)
        cfg = cfg.replace(train={"epochs": saved.train.epochs})
    cost = _read_cost(run_dir)
    budgeting = spec.budget_seconds is not None and not planned
    if "gflops_per_image" not in cost or budgeting:
        with local_only():  # rank 0 times one process while the others wait
            speed = measure_training(cfg)
        cost |= {"gflops_per_image": float(f"{speed.gflops_per_image:.4g}"),
                 "calibrated_img_per_s": round(speed.images_per_second, 2)}
        if budgeting:  # under torchrun each of the `world` processes trains at that speed
            epochs = spec.budget_seconds * speed.images_per_second * world / n_train
            cfg = cfg.replace(train={"epochs": round(max(epochs, 1e-3), 4)})
    return cfg, cost, run_finished(run_dir)


def _evals_to_run(spec: CompareSpec, entries: list[tuple[str, str]],
                  run_ids: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, checkpoint, protocol) of every evaluation the store does not hold yet."""
    store = read_store(spec.results_dir)
    return [(name, checkpoint, protocol) for name, checkpoint in entries
            for protocol in spec.protocols
            if not (checkpoint == "pixels" and not takes_pixels(protocol))
            and not _has_rows(store, run_ids[name], spec, protocol, _arch_of(spec, name))]


def compare_table(store: pd.DataFrame, spec: CompareSpec, run_ids: dict[str, str],
                  run_dirs: dict[str, Path]) -> pd.DataFrame:
    """One row per method / reference (named METHOD@ARCH when the backbones differ): top-1 of
    each protocol (k-NN at ``spec.k``), then the cost columns (pretraining wall time,
    epochs, GFLOPs per image per step, images/s)."""
    rows = []
    for name, run_id in run_ids.items():
        row: dict[str, Any] = {"method": name}  # METHOD@ARCH when the backbones differ
        for protocol in spec.protocols:
            pick = headline(protocol, k=spec.k)
            sel = _select(store, run_id, spec, protocol, _arch_of(spec, name))
            sel = sel[sel["metric"] == "top1"]
            for column, value in pick.items():
                sel = sel[sel[column] == value]
            row[column_label(protocol, pick)] = (float(sel["value"].iloc[-1]) if len(sel)
                                                 else float("nan"))
        cost = _read_cost(run_dirs[name]) if name in run_dirs else {}
        row["pretrain s"] = cost.get("pretrain_seconds", float("nan"))
        row["epochs"] = cost.get("pretrain_epochs", float("nan"))
        row["GFLOPs/img/step"] = cost.get("gflops_per_image", float("nan"))
        row["img/s"] = cost.get("pretrain_img_per_s", float("nan"))
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def takes_pixels(protocol: str) -> bool:
    """Whether the pixels reference is evaluated with ``protocol``: raw pixels have no encoder
    to train (the rule ``validate_spec`` applies)."""
    return not get_protocol(protocol).trains_encoder


def column_label(protocol: str, pick: dict[str, Any]) -> str:
    """A top-1 column's name: the protocol, and the row fields that picked its number
    ("knn top-1 (k=20)")."""
    named = ", ".join(f"{column}={value}" for column, value in pick.items())
    return f"{protocol} top-1" + (f" ({named})" if named else "")


def at_headline(rows: pd.DataFrame, k: int) -> pd.DataFrame:
    """``rows`` without those a one-column table does not show: k-NN rows of another
    neighbour count than ``k`` (each protocol's ``headline``)."""
    keep = pd.Series(True, index=rows.index)
    for protocol in rows["protocol"].unique():
        for column, value in headline(protocol, k=k).items():
            if column in rows:
                keep &= (rows["protocol"] != protocol) | (rows[column] == value)
    return rows[keep]


def _arch_of(spec: CompareSpec, name: str) -> str:
    """The backbone of a table row: a ``--methods`` entry's, a reference's."""
    for ref, _, arch in references(spec):
        if ref == name:
            return arch
    return entry(spec, name)[1]


def _eval_spec(spec: CompareSpec, protocol: str, checkpoint: str,
               extra: dict[str, Any] | None = None, arch: str | None = None) -> EvalSpec:
    # One label fraction for the few-shot protocol, a short schedule for those that train the
    # encoder (a first look, not the paper's 100 epochs).
    measure = get_protocol(protocol)
    return EvalSpec(protocol=protocol, checkpoint=checkpoint,
                    arch=(arch or spec.arch) if checkpoint == "random" else None,
                    dataset=spec.dataset, data_dir=spec.data_dir, pool=spec.pool,
                    label_fraction=spec.label_fraction if measure.few_shot else 1.0,
                    epochs=spec.finetune_epochs if measure.trains_encoder else None,
                    recipe=spec.recipe, seed=spec.seed, device=spec.device,
                    precision=spec.precision, cache_dir=spec.cache_dir, use_cache=spec.use_cache,
                    results_dir=spec.results_dir, extra=extra or {})


def _run_id(spec: CompareSpec, checkpoint: str, arch: str | None = None) -> str:
    """The run_id the rows of this encoder carry (the reference rows' depend on the data)."""
    return source_of(_eval_spec(spec, "knn", checkpoint, arch=arch)).run_id


def _select(store: pd.DataFrame, run_id: str, spec: CompareSpec, protocol: str,
            arch: str) -> pd.DataFrame:
    if store.empty or "run_id" not in store:
        return store
    sel = store[(store["run_id"] == run_id) & (store["dataset"] == spec.dataset)
                & (store["protocol"] == protocol) & (store["status"] == "ok")]
    # the pool asked for; without --pool the encoder's own (a ViT preset's: cls)
    pool = spec.pool or ("cls" if is_vit(arch) else None)
    if "pool" in sel and pool is not None and not run_id.startswith("pixels"):
        sel = sel[sel["pool"].isna() | (sel["pool"] == pool)]
    if get_protocol(protocol).trains_encoder:  # rows of this schedule and recipe only
        for column, wanted in (("epochs", spec.finetune_epochs), ("recipe", spec.recipe)):
            sel = sel[sel[column] == wanted] if column in sel else sel.iloc[:0]
    return sel


def _has_rows(store: pd.DataFrame, run_id: str, spec: CompareSpec, protocol: str,
              arch: str) -> bool:
    return len(_select(store, run_id, spec, protocol, arch)) > 0


def silent(message: str) -> None:
    """The log of torchrun ranks other than 0 (compare and sweep)."""


def read_store(results_dir: str) -> pd.DataFrame:
    """The results store's rows; an empty frame when there is none yet."""
    path = Path(results_dir)
    if not (path / RESULTS_FILE).is_file() and not path.is_file():
        return pd.DataFrame()
    return read_results(path)


def run_finished(run_dir: Path) -> bool:
    """Whether the run folder holds a finished run (its summary.json says so)."""
    return bool(read_json(run_dir / SUMMARY_FILE).get("finished"))


def read_json(path: Path) -> dict[str, Any]:
    """A small JSON file of a run folder; {} when missing or unreadable (it is re-measured)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _read_cost(run_dir: Path) -> dict[str, Any]:
    """The costs compare recorded for a run ({} when none or unreadable: they are re-measured)."""
    return read_json(run_dir / COST_FILE)
