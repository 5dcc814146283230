"""``mae-bench eval``: resolve the encoder and the data, run one protocol, record result rows.

This is the glue between the command line and the protocols (``evals/protocols/``, one class
each, registered by name): it loads what the ``EvalSpec`` names, validates it once, asks the
protocol object to run, and turns the returned numbers into result rows (one per number) that
``mae_bench.results`` appends to the store. It never branches on a protocol's name: what differs
between protocols is a method of the protocol.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.encoders import EncoderSource, FeaturesSource, reference_kind
from evals.features import ALL_POOLS, attention_kernel, input_transform
from evals.protocol import EvalContext, EvalInputs, Numbers, Progress, Protocol, validate_knobs
from evals.protocols import PROTOCOLS, get_protocol
from evals.protocols.linear import PROBES
from evals.sources import SourceOptions, check_output, is_outside, object_source, resolve_source
from mae_bench.app.eval_spec import EvalSpec, EvalTarget
from mae_bench.data import cache_writes_held, get_dataset_info, load_dataset
from mae_bench.data.datasets import AnyDataset
from mae_bench.data.info import DatasetInfo
from mae_bench.errors import ConfigError, DataError, StoreWriteError
from mae_bench.models.backbones import check_arch, is_vit
from mae_bench.results import (
    RESULTS_FILE,
    append_rows,
    check_writable,
    make_row,
    stored_evaluation,
)
from mae_bench.training.distributed import (
    broadcast_from_main,
    is_main_process,
    join_process_group,
    wait_for_main,
)
from mae_bench.training.runtime import resolve_device, resolve_precision

__all__ = ["PROBES", "PROTOCOLS", "EvalOutcome", "EvalSpec", "EvalTarget", "Inputs", "Numbers",
           "Progress", "eval_identity", "load_inputs", "run_eval", "source_of", "validate_spec"]

FOLDER_DATASETS = ("imagefolder",)  # data set names that say only how files are laid out
Inputs = EvalInputs  # the name this module gave it before the protocols moved to evals/


def protocol_options(spec: Any) -> tuple[Protocol, Any]:
    """The spec's protocol and its options (each knob checked)."""
    protocol = get_protocol(spec.protocol)
    return protocol, protocol.options({f.name: getattr(spec, f.name)
                                       for f in dataclasses.fields(spec)})


def _and(names: list[str], word: str = "and") -> str:
    return ", ".join(names[:-1]) + f" {word} {names[-1]}" if len(names) > 1 else names[0]


def validate_spec(spec: Any) -> None:
    """Checks that need nothing loaded. Raises ConfigError naming the bad value and the fix."""
    protocol = get_protocol(spec.protocol)
    outside = is_outside(spec.checkpoint) or spec.encoder is not None
    reference = reference_kind(spec.checkpoint)
    checks = [
        (sum(v is not None for v in (spec.checkpoint, spec.features_dir, spec.encoder)) == 1,
         "give exactly one of --checkpoint (a run, an official MAE checkpoint, pixels, random, "
         "or timm: / hf: / hub: / python: models) and --features DIR"),
        (spec.pool is None or spec.pool in ALL_POOLS,
         f"unknown pool {spec.pool!r}; valid: {', '.join(ALL_POOLS)}"),
        (spec.img_size is None or spec.img_size >= 1,
         f"--img-size must be a positive number of pixels, got {spec.img_size}"),
        (spec.img_size is None or outside or (reference is not None and reference.sized_by_data),
         "--img-size sets the input size of the random reference or an outside model (timm:, "
         "hf:, hub:, python:); a checkpoint keeps its own"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if spec.arch is not None:
        check_arch(spec.arch)  # an unknown name, before any checkpoint is read
    validate_knobs(spec)  # every protocol's knob, whichever protocol runs
    protocol, options = protocol_options(spec)
    protocol.validate(options)
    frozen = [p.name for p in PROTOCOLS.values() if not p.trains_encoder]
    if spec.features_dir is not None and not protocol.frozen(options):
        raise ConfigError(
            (None if protocol.trains_encoder else protocol.features_refusal(options))
            or f"--features works with {_and(frozen)} (features are frozen); {spec.protocol} "
               "needs --checkpoint")
    if outside and not protocol.frozen(options):
        name = spec.checkpoint or "an outside encoder"
        usages = [p.frozen_usage for p in PROTOCOLS.values() if p.frozen_usage is not None]
        raise ConfigError(f"{name} is evaluated on frozen features only "
                          f"({protocol.describe(options)} trains a mae-bench ViT); use "
                          f"{', '.join(usages)}")
    if reference is not None and not reference.vit and protocol.trains_encoder:
        raise ConfigError(f"the pixels reference has no encoder to {spec.protocol}; use "
                          f"{_and(frozen, 'or')}")


# --- inputs ----------------------------------------------------------------------------------


def _labelled(dataset: AnyDataset, name: str, split: str) -> AnyDataset:
    if len(dataset) == 0:
        raise DataError(f"{name}/{split} has no images")
    if bool((dataset.labels < 0).any()):
        raise DataError(f"{name}/{split} has unlabeled images; evaluation needs labels (use the "
                        "train and test splits)")
    return dataset


def load_inputs(spec: EvalSpec) -> Inputs:
    """Resolve the source and the data. Everything that can fail on user input fails here,
    before any work or any write."""
    validate_spec(spec)
    reference = reference_kind(spec.checkpoint)
    if reference is not None and reference.sized_by_data:
        # The random reference is built for the data as loaded (an image folder's own size and
        # channels, not the registry's defaults).
        return _with_data(spec, lambda info: source_of(spec, info), {})
    source = source_of(spec)  # every other source is known before the data
    features = source.given_features()
    if features is not None:  # precomputed embeddings: they are the data
        return Inputs(source, spec.dataset or source.label, pool=spec.pool or source.default_pool,
                      features=features, label=source.label)
    return _with_data(spec, lambda info: source, source.pretrain)


def _with_data(spec: EvalSpec, source_for: Callable[[DatasetInfo], EncoderSource],
               pretrain: dict[str, Any]) -> Inputs:
    """Both splits of the spec's data (default: the data set the source was pretrained on,
    from its folder, else digits) and the source made for them (``source_for``)."""
    pretrained_on = pretrain.get("pretrain_dataset")
    name = spec.dataset or pretrained_on or "digits"
    get_dataset_info(name)  # an unknown name fails here, before any file is read
    data_dir = spec.data_dir
    if data_dir is None and name == pretrained_on:
        data_dir = pretrain.get("data_dir")
    with cache_writes_held():  # a decoded folder is cached only if both splits pass
        train = _labelled(load_dataset(name, "train", data_dir), name, "train")
        test = _labelled(load_dataset(name, "test", data_dir), name, "test")
        info = train.info
        source = source_for(info)
        if not source.takes_channels(info.channels):
            raise ConfigError(f"{source.label} takes {source.channels}-channel images but {name} "
                              f"has {info.channels}; evaluate on a data set with "
                              f"{source.channels} channels")
        if source.encoder is not None:  # an outside model: what it returns, and which pools
            img_size, _, _, channels = input_transform(train, source)
            check_output(source, img_size, channels)
        pool = spec.pool or source.default_pool
        if pool not in source.pools:
            raise ConfigError(f"--pool {pool}: {source.label} offers {', '.join(source.pools)}")
    return Inputs(source, name, train, test, pool=pool, label=source.label,
                  data_dir=str(Path(data_dir).resolve()) if data_dir else None)


def source_of(spec: EvalSpec, info: DatasetInfo | None = None) -> EncoderSource:
    """The source a spec names (a run, an official checkpoint, a reference row, an outside
    model, the Python API's object, or ``--features``). The random reference takes
    ``--img-size`` or the size and channels of ``info`` (the data as loaded; None: the
    registry's description of ``spec.dataset``)."""
    if spec.features_dir is not None:
        return FeaturesSource.load(spec.features_dir)
    options = SourceOptions(weights=spec.weights, pretrained=spec.pretrained,
                            img_size=spec.img_size, seed=spec.seed, trust=spec.trust_checkpoint,
                            trust_repo=spec.trust_repo)
    if spec.encoder is not None:
        return object_source(spec.encoder, options)
    if is_outside(spec.checkpoint):
        return resolve_source(spec.checkpoint, options, arch=spec.arch)
    reference = reference_kind(spec.checkpoint)
    img_size = channels = None
    if reference is not None and reference.sized_by_data:
        info = info or get_dataset_info(spec.dataset or "digits")
        img_size, channels = spec.img_size or info.img_size, info.channels
        if spec.arch is not None and is_vit(spec.arch):  # a CNN or timm model takes any size
            from mae_bench.models.vit import get_preset

            patch = get_preset(spec.arch).patch_size
            if img_size % patch:
                raise ConfigError(f"--arch {spec.arch} has {patch}-px patches, which do not "
                                  f"divide {info.name}'s {img_size}-px images; pick a preset "
                                  "whose patch size divides it (or --img-size)")
    return resolve_source(spec.checkpoint, options, arch=spec.arch, img_size=img_size,
                          channels=channels, seed=spec.seed if reference is not None else 0,
                          trust=spec.trust_checkpoint)


# --- running ---------------------------------------------------------------------------------


@dataclass
class EvalOutcome:
    rows: list[dict[str, Any]]
    results_file: Path | None  # None: the spec wrote no rows (the Python API's default)
    seconds: float
    notes: list[str]
    # Set when the same evaluation was already in the store: the one line saying so; ``rows``
    # are then the stored ones and nothing was run or written.
    skipped: str | None = None


# EvalSpec fields that are not part of what an evaluation measures: where things are, how they
# are shown, or what the identity records in resolved form (the source's fingerprint, the data's
# content, the resolved precision; ``ks`` are told apart per row by ``k``).
_NOT_IDENTITY = frozenset(("checkpoint", "features_dir", "encoder", "weights", "pretrained",
                           "arch", "dataset", "data_dir", "ks", "command", "device", "precision",
                           "cache_dir", "use_cache", "trust_checkpoint", "trust_repo",
                           "results_dir", "force"))


def eval_identity(spec: EvalSpec, inputs: Inputs, precision: str, attention: str | None
                  ) -> str | None:
    """``eval_key``: a short hash of what makes two evaluations the same measurement: the
    encoder (kind, run id, label, weights fingerprint), the data (name, folder, content of both
    splits), every option that changes the numbers (protocol, pool, seed, recipe knobs, ...),
    the precision and the attention kernel. None for a plain callable, whose code no
    fingerprint sees: its evaluations are never taken for one another."""
    if not inputs.source.cacheable:
        return None
    options = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
               if f.name not in _NOT_IDENTITY}
    blob = json.dumps([inputs.source.identity(), inputs.data_identity(), options, precision,
                       attention], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _already_stored(spec: EvalSpec, key: str | None) -> list[dict[str, Any]]:
    """The stored ok rows of this evaluation when they cover it (the protocol decides: k-NN
    needs every ``--k``); [] when it must run (no store, not there, ``--force``, or no key)."""
    if spec.force or key is None or spec.results_dir is None:
        return []
    rows = stored_evaluation(spec.results_dir, key)
    if rows.empty:
        return []
    protocol, options = protocol_options(spec)
    if not protocol.covers(options, rows):
        return []
    return [{k: v for k, v in r.items() if not _missing(v)} for r in rows.to_dict("records")]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def run_eval(spec: EvalSpec, progress: Progress | None = None,
             show: Callable[[EvalOutcome], None] | None = None) -> EvalOutcome:
    """Run one evaluation and append its rows to ``spec.results_dir``.

    The store is checked for writing before any work (``ConfigError`` if it cannot be), and
    ``show`` (the CLI's table) sees the outcome before the rows are written, so a store that
    fails at the end still leaves the numbers on the screen.

    Under torchrun (``torchrun --nproc_per_node N -m mae_bench eval ...``) every rank extracts
    the features of its part of the data and rank 0 runs k-NN / the fast probe on all of them;
    the training protocols (linear ``--probe mae``, fine-tuning) train with
    DistributedDataParallel. Rank 0 writes the rows; the other ranks return none.
    """
    start = time.perf_counter()
    inputs = load_inputs(spec)
    spec = dataclasses.replace(spec, pool=inputs.pool)  # --pool, else the encoder's own
    writes = spec.results_dir is not None
    if is_main_process() and writes:  # after the input checks (a bad command writes nothing)
        check_writable(spec.results_dir)
    device = join_process_group(resolve_device(spec.device))  # torchrun: gloo / NCCL
    precision = resolve_precision(spec.precision, device)
    attention = attention_kernel(inputs.source, device, precision)
    key = eval_identity(spec, inputs, precision, attention)
    # Rank 0 reads the store and decides for every rank.
    stored = broadcast_from_main(_already_stored(spec, key) if is_main_process() else None)
    if stored:
        store = Path(spec.results_dir) / RESULTS_FILE
        message = (f"already in {store}: {spec.protocol} of {inputs.label} on {inputs.dataset} "
                   f"(seed {spec.seed}, {precision}); --force re-runs it")
        return EvalOutcome(stored if is_main_process() else [], store, 0.0, [message],
                           skipped=message)
    identity = {"precision": precision, "attention": attention, "eval_key": key}
    protocol, options = protocol_options(spec)
    context = EvalContext(inputs, device, precision, seed=spec.seed,
                          cache_dir=Path(spec.cache_dir) if spec.cache_dir else None,
                          use_cache=spec.use_cache, progress=progress)
    numbers = protocol.run(options, context)
    notes = context.notes
    seconds = time.perf_counter() - start
    rows = _rows(spec, inputs, numbers, seconds, identity)
    outcome = EvalOutcome(rows, Path(spec.results_dir) / RESULTS_FILE if writes else None,
                          seconds, notes)
    if is_main_process():  # under torchrun rank 0 alone holds the numbers and writes them
        if show is not None:
            show(outcome)
        try:
            if writes:
                append_rows(spec.results_dir, rows)
        except OSError as exc:  # the store went away or filled up after the check
            raise StoreWriteError(spec.results_dir, exc.strerror or exc,
                                  "the numbers are only on the screen") from None
    else:
        outcome.rows = []
    wait_for_main()  # no rank starts the next job (a sweep's next point) before the rows exist
    return outcome


def _rows(spec: EvalSpec, inputs: Inputs, numbers: Numbers, seconds: float,
          identity: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per number. ``identity``: the resolved precision, attention kernel and
    ``eval_key`` (``eval_identity``); the ones that do not apply (None) are left out."""
    src = inputs.source
    protocol, options = protocol_options(spec)
    common: dict[str, Any] = {
        "run_id": src.run_id,
        "method": src.method,
        "arch": src.arch,
        "dataset": inputs.dataset,
        "protocol": spec.protocol,
        "checkpoint": src.checkpoint_name,
        "eval_seconds": round(seconds, 3),
        "eval_seed": spec.seed,
    }
    if protocol.uses_pool and src.pooled:
        common["pool"] = spec.pool
    if spec.label_fraction < 1.0:
        common["label_fraction"] = spec.label_fraction
    if inputs.dataset in FOLDER_DATASETS and inputs.data_dir:
        # "imagefolder" names a format, not a data set: the folder is part of its identity,
        # so numbers on two folders are never averaged together.
        common["data_dir"] = inputs.data_dir
    # From random weights (--init random) a checkpoint lends only its architecture: the rows
    # are the random reference's, without its pretraining epochs, seconds or mask ratio.
    scratch = protocol.trains_from_scratch(options, src) and src.own_weights
    if scratch:
        common |= {"method": "random", "seed": spec.seed}
    else:
        common |= {k: v for k, v in src.pretrain.items() if k not in ("data_dir", "checkpoint")}
        if src.reference:
            common["seed"] = spec.seed
    common.setdefault("seed", spec.seed)
    common |= protocol.row_fields(options, src)
    if spec.command:
        common["command"] = spec.command
    if src.own_weights and not scratch:
        common["weights"] = src.fingerprint[:12]  # the encoder's identity: a hash of its weights
    data_px = inputs.train.info.img_size if inputs.train is not None else None
    if src.img_size and data_px and src.img_size != data_px:
        common["img_size"] = src.img_size  # the images were resized to the encoder's input
    unreadable = sum(d.bad_images for d in (inputs.train, inputs.test) if d is not None)
    if unreadable:  # files the loader left out: the numbers are on fewer images
        common["skipped_images"] = unreadable
    common |= {name: value for name, value in identity.items() if value is not None}
    common |= spec.extra
    return [make_row(metric=metric, value=float(value), **(common | knobs))
            for metric, value, knobs in numbers]
