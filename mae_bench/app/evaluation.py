"""``mae-bench eval``: resolve the encoder and the data, run one protocol, record result rows.

This is the glue between the command line and the protocol functions (``evals/knn.py``,
``evals/linear.py``, ``evals/finetune.py``): it loads what the ``EvalSpec`` names, validates it
once, calls the protocol, and turns the returned numbers into result rows (one per number) that
``mae_bench.results`` appends to the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evals.encoders import FROZEN_PROTOCOLS, REFERENCES, EncoderSource
from evals.features import (
    ALL_POOLS,
    attention_kernel,
    dataset_fingerprint,
    features_for,
    input_transform,
)
from evals.recipes import RECIPES, FinetuneRecipe, finetune_recipe, probe_recipe
from evals.sources import SourceOptions, check_output, is_outside, object_source, resolve_source
from evals.splits import stratified_subset
from mae_bench.data import cache_writes_held, get_dataset_info, load_dataset
from mae_bench.data.datasets import AnyDataset, ArrayDataset
from mae_bench.data.info import DatasetInfo
from mae_bench.data.randaugment import RandAugmentSpec
from mae_bench.errors import ConfigError, DataError
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

PROTOCOLS = ("knn", "linear", "fewshot", "finetune", "partial-finetune")
# Data sets whose classes change under a horizontal flip (digits, house numbers): their training
# views are not flipped.
NO_FLIP = frozenset(("digits", "mnist", "svhn"))
PROBES = ("fast", "mae")
FEATURE_FILES = ("train_features.npy", "train_labels.npy", "test_features.npy",
                 "test_labels.npy")

Progress = Callable[[str, int, int], None]  # (what, done, total)
FOLDER_DATASETS = ("imagefolder",)  # data set names that say only how files are laid out


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation, as the user asked for it (built once at the edge, by the CLI)."""

    protocol: str
    # run folder / checkpoint file / "pixels" / "random" / an outside model ("timm:NAME", ...)
    checkpoint: str | None = None
    features_dir: str | None = None  # precomputed embeddings instead of an encoder
    # The Python API's encoder: an nn.Module, a callable from images to features, or a resolved
    # EncoderSource (instead of checkpoint).
    encoder: Any = None
    weights: str | None = None  # an outside model's weights file
    pretrained: bool = False  # timm: its own pretrained weights
    arch: str | None = None
    dataset: str | None = None  # default: the run's pretraining data set, else digits
    data_dir: str | None = None
    pool: str | None = None  # None: the encoder's own (cls; an outside model's pooled output)
    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    probe: str = "fast"  # linear / fewshot: fast (cached features) | mae (augmented, LARS)
    label_fraction: float = 1.0
    blocks: int | None = None  # partial-finetune: trained blocks
    init: str = "pretrained"  # finetune: pretrained | random (the from-scratch baseline)
    # Trained protocols: a recipe (evals/recipes.py: auto | paper) and overrides of its knobs
    # (None: the recipe's value).
    recipe: str = "auto"
    epochs: int | None = None
    batch_size: int | None = None
    blr: float | None = None
    lr: float | None = None
    weight_decay: float | None = None
    layer_decay: float | None = None
    drop_path: float | None = None
    mixup: float | None = None
    cutmix: float | None = None
    label_smoothing: float | None = None
    crop_min: float | None = None  # finetune: RandomResizedCrop from this share of the area
    img_size: int | None = None  # random reference / outside model: input size (default: own)
    head_bn: bool | None = None  # finetune: BatchNorm before the head (default: the recipe's)
    erase: float | None = None  # finetune: random erasing probability (default: the recipe's)
    rand_augment: str | None = None  # finetune: RandAugment policy, "none": off (recipe's)
    command: str | None = None  # the command line that asked for this evaluation, for its rows
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    cache_dir: str | None = None
    use_cache: bool = True
    trust_checkpoint: bool = False
    trust_repo: bool = False  # hub: run a repository's code that torch.hub does not trust yet
    results_dir: str | None = "results"  # None: return the rows without writing them
    # Run an evaluation already in the store again; its rows supersede the old ones.
    force: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more fields for every row (sweeps)


def validate_spec(spec: EvalSpec) -> None:
    """Checks that need nothing loaded. Raises ConfigError naming the bad value and the fix."""
    outside = is_outside(spec.checkpoint) or spec.encoder is not None
    checks = [
        (spec.protocol in PROTOCOLS,
         f"unknown protocol {spec.protocol!r}; valid: {', '.join(PROTOCOLS)}"),
        (sum(v is not None for v in (spec.checkpoint, spec.features_dir, spec.encoder)) == 1,
         "give exactly one of --checkpoint (a run, an official MAE checkpoint, pixels, random, "
         "or timm: / hf: / hub: / python: models) and --features DIR"),
        (spec.pool is None or spec.pool in ALL_POOLS,
         f"unknown pool {spec.pool!r}; valid: {', '.join(ALL_POOLS)}"),
        (spec.probe in PROBES, f"unknown probe {spec.probe!r}; valid: {', '.join(PROBES)}"),
        (len(spec.ks) > 0 and all(k >= 1 for k in spec.ks),
         f"--k needs positive neighbour counts, got {','.join(map(str, spec.ks)) or 'none'}"),
        (spec.temperature > 0, f"--temperature must be > 0, got {spec.temperature}"),
        (0.0 < spec.label_fraction <= 1.0,
         f"--label-fraction must be in (0, 1], got {spec.label_fraction}"),
        (spec.img_size is None or spec.img_size >= 1,
         f"--img-size must be a positive number of pixels, got {spec.img_size}"),
        (spec.img_size is None or spec.checkpoint == "random" or outside,
         "--img-size sets the input size of the random reference or an outside model (timm:, "
         "hf:, hub:, python:); a checkpoint keeps its own"),
        (spec.crop_min is None or 0.0 < spec.crop_min <= 1.0,
         f"--crop-min must be in (0, 1] (1 = no crops), got {spec.crop_min}"),
        (spec.init in ("pretrained", "random"),
         f"--init must be pretrained or random, got {spec.init!r}"),
        (spec.epochs is None or spec.epochs >= 1, f"--epochs must be >= 1, got {spec.epochs}"),
        (spec.batch_size is None or spec.batch_size >= 2,
         f"--batch-size must be >= 2, got {spec.batch_size}"),
        (spec.blocks is None or spec.blocks >= 0, f"--blocks must be >= 0, got {spec.blocks}"),
        (spec.layer_decay is None or 0.0 < spec.layer_decay <= 1.0,
         f"--layer-decay must be in (0, 1], got {spec.layer_decay}"),
        (spec.drop_path is None or 0.0 <= spec.drop_path < 1.0,
         f"--drop-path must be in [0, 1), got {spec.drop_path}"),
        (spec.recipe in RECIPES, f"unknown recipe {spec.recipe!r}; valid: {', '.join(RECIPES)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if spec.rand_augment not in (None, "none"):
        RandAugmentSpec.parse(spec.rand_augment)  # a bad policy: ConfigError naming the part
    if spec.features_dir is not None and spec.protocol not in ("knn", "linear", "fewshot"):
        raise ConfigError(f"--features works with knn, linear and fewshot (features are frozen); "
                          f"{spec.protocol} needs --checkpoint")
    if spec.features_dir is not None and spec.probe == "mae":
        raise ConfigError("--probe mae augments images through the encoder; with --features use "
                          "--probe fast")
    if spec.protocol == "partial-finetune" and spec.blocks is None:
        raise ConfigError("partial-finetune needs --blocks N (train the last N blocks + head)")
    if spec.protocol == "fewshot" and spec.label_fraction >= 1.0:
        raise ConfigError("fewshot needs --label-fraction below 1, e.g. 0.01 or 0.1")
    if outside and (spec.protocol not in ("knn", "linear", "fewshot")
                    or (spec.probe == "mae" and spec.protocol != "knn")):
        what = spec.protocol if spec.probe != "mae" else f"{spec.protocol} --probe mae"
        name = spec.checkpoint or "an outside encoder"
        raise ConfigError(f"{name} is evaluated on frozen features only ({what} trains a "
                          f"mae-bench ViT); use {', '.join(FROZEN_PROTOCOLS)}")
    if spec.checkpoint == "pixels" and spec.protocol not in ("knn", "linear", "fewshot"):
        raise ConfigError(f"the pixels reference has no encoder to {spec.protocol}; use knn, "
                          "linear or fewshot")


# --- inputs ----------------------------------------------------------------------------------


def load_feature_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """Read and check DIR/{train,test}_{features,labels}.npy (precomputed embeddings)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"--features {path}: no such folder; it must hold "
                        f"{', '.join(FEATURE_FILES)}")
    missing = [f for f in FEATURE_FILES if not (path / f).is_file()]
    if missing:
        raise DataError(f"--features {path} lacks {', '.join(missing)} (it must hold "
                        f"{', '.join(FEATURE_FILES)})")
    arrays = {}
    for name in FEATURE_FILES:
        try:
            arrays[name] = np.load(path / name, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"--features: {path / name} is not a readable .npy array "
                            f"({str(exc).splitlines()[0][:80]})") from None
    out = {}
    for split in ("train", "test"):
        feats, labels = arrays[f"{split}_features.npy"], arrays[f"{split}_labels.npy"]
        if feats.ndim != 2 or feats.shape[0] == 0 or not np.issubdtype(feats.dtype, np.number):
            raise DataError(f"--features: {split}_features.npy must be a non-empty numeric "
                            f"[N, D] array, got shape {feats.shape} ({feats.dtype})")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"--features: {split}_labels.npy must be a 1-D integer array, got "
                            f"shape {labels.shape} ({labels.dtype})")
        if labels.shape[0] != feats.shape[0]:
            raise DataError(f"--features: {split}_features.npy has {feats.shape[0]} rows but "
                            f"{split}_labels.npy has {labels.shape[0]} labels")
        if labels.min() < 0:
            raise DataError(f"--features: {split}_labels.npy has negative labels (unlabeled "
                            "samples cannot be evaluated)")
        if not np.isfinite(feats).all():
            raise DataError(f"--features: {split}_features.npy holds NaN or inf values")
        out[f"{split}_features"] = torch.from_numpy(np.ascontiguousarray(feats)).float()
        out[f"{split}_labels"] = torch.from_numpy(labels.astype(np.int64))
    if out["train_features"].shape[1] != out["test_features"].shape[1]:
        raise DataError(f"--features: train features have {out['train_features'].shape[1]} "
                        f"dimensions, test features {out['test_features'].shape[1]}")
    return out


def _labelled(dataset: AnyDataset, name: str, split: str) -> AnyDataset:
    if len(dataset) == 0:
        raise DataError(f"{name}/{split} has no images")
    if bool((dataset.labels < 0).any()):
        raise DataError(f"{name}/{split} has unlabeled images; evaluation needs labels (use the "
                        "train and test splits)")
    return dataset


@dataclass
class Inputs:
    """What one evaluation reads: the encoder source and the two splits (or features)."""

    source: EncoderSource | None
    dataset: str
    train: AnyDataset | None = None
    test: AnyDataset | None = None
    features: dict[str, torch.Tensor] | None = None
    label: str = ""
    data_dir: str | None = None  # where the data were read from (resolved)
    pool: str = "cls"  # the frozen features' pooling (--pool, else the encoder's own)


def load_inputs(spec: EvalSpec) -> Inputs:
    """Resolve the checkpoint (or features) and the data. Everything that can fail on user
    input fails here, before any work or any write."""
    validate_spec(spec)
    if spec.features_dir is not None:
        feats = load_feature_dir(spec.features_dir)
        label = Path(spec.features_dir).resolve().name
        return Inputs(None, spec.dataset or label, pool=spec.pool or "cls", features=feats,
                      label=label)
    # The random reference is built for the data as loaded (an image folder's own size and
    # channels, not the registry's defaults); every other source is known before the data.
    source = None if spec.checkpoint == "random" else source_of(spec)
    pretrained_on = source.pretrain.get("pretrain_dataset") if source is not None else None
    name = spec.dataset or pretrained_on or "digits"
    info = get_dataset_info(name)
    data_dir = spec.data_dir
    if data_dir is None and name == pretrained_on:
        data_dir = source.pretrain.get("data_dir")
    with cache_writes_held():  # a decoded folder is cached only if both splits pass
        train = _labelled(load_dataset(name, "train", data_dir), name, "train")
        test = _labelled(load_dataset(name, "test", data_dir), name, "test")
        info = train.info
        if source is None:
            source = source_of(spec, info)
        # An outside RGB model sees grayscale images replicated to three channels.
        replicated = source.kind == "outside" and (source.channels, info.channels) == (3, 1)
        if source.channels is not None and source.channels != info.channels and not replicated:
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
    """The encoder a spec names (a run, an official checkpoint, a reference row, an outside
    model, or the Python API's object). The random reference takes ``--img-size`` or the size
    and channels of ``info`` (the data as loaded; None: the registry's description of
    ``spec.dataset``)."""
    options = SourceOptions(weights=spec.weights, pretrained=spec.pretrained,
                            img_size=spec.img_size, seed=spec.seed, trust=spec.trust_checkpoint,
                            trust_repo=spec.trust_repo)
    if spec.encoder is not None:
        return object_source(spec.encoder, options)
    if is_outside(spec.checkpoint):
        return resolve_source(spec.checkpoint, options, arch=spec.arch)
    ref = spec.checkpoint in REFERENCES
    img_size = channels = None
    if spec.checkpoint == "random":
        info = info or get_dataset_info(spec.dataset or "digits")
        img_size, channels = spec.img_size or info.img_size, info.channels
        if spec.arch is not None:
            from mae_bench.models.vit import get_preset

            patch = get_preset(spec.arch).patch_size
            if img_size % patch:
                raise ConfigError(f"--arch {spec.arch} has {patch}-px patches, which do not "
                                  f"divide {info.name}'s {img_size}-px images; pick a preset "
                                  "whose patch size divides it (or --img-size)")
    return resolve_source(spec.checkpoint, options, arch=spec.arch, img_size=img_size,
                          channels=channels, seed=spec.seed if ref else 0,
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
    src = inputs.source
    if src is not None and not src.cacheable:
        return None
    if src is not None:
        source = [src.kind, src.run_id, src.label, src.fingerprint]
        data = [inputs.dataset, inputs.data_dir, dataset_fingerprint(inputs.train),
                dataset_fingerprint(inputs.test)]
    else:  # --features: the embeddings are the source and the data
        h = hashlib.blake2b(digest_size=16)
        for name in sorted(inputs.features):
            h.update(inputs.features[name].numpy().tobytes())
        source, data = ["features", inputs.label, h.hexdigest()], [inputs.dataset]
    options = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
               if f.name not in _NOT_IDENTITY}
    blob = json.dumps([source, data, options, precision, attention], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _already_stored(spec: EvalSpec, key: str | None) -> list[dict[str, Any]]:
    """The stored ok rows of this evaluation when they cover it (for k-NN: every ``--k``);
    [] when it must run (no store, not there, ``--force``, or no key)."""
    if spec.force or key is None or spec.results_dir is None:
        return []
    rows = stored_evaluation(spec.results_dir, key)
    if rows.empty:
        return []
    if spec.protocol == "knn" and not set(spec.ks) <= set(rows["k"].dropna().astype(int)):
        return []  # more neighbour counts asked for: run it; the repeated ks supersede
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
    attention = attention_kernel(inputs.source, device, precision) if inputs.source else None
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
    notes: list[str] = []
    protocol = spec.protocol
    if protocol in ("knn", "linear", "fewshot") and (spec.probe == "fast" or protocol == "knn"):
        numbers = _frozen_feature_protocol(spec, inputs, device, precision, notes, progress)
    elif protocol in ("linear", "fewshot"):
        numbers = _mae_linear(spec, inputs, device, precision, notes, progress)
    else:
        numbers = _finetune(spec, inputs, device, precision, notes, progress)
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
            raise ConfigError(f"--results-dir {spec.results_dir}: the rows could not be written "
                              f"({exc.strerror or exc}); the numbers are only on the screen"
                              ) from None
    else:
        outcome.rows = []
    wait_for_main()  # no rank starts the next job (a sweep's next point) before the rows exist
    return outcome


# A protocol's numbers: (metric, value, knobs for this number only).
Numbers = list[tuple[str, float, dict[str, Any]]]


def _check_fraction_leaves_two(spec: EvalSpec, labels: torch.Tensor,
                               subset: torch.Tensor) -> None:
    """The fast probe chooses its weight decay on a validation split, 2 samples per class at
    least: name --label-fraction when it is what leaves a class one (not the class's size)."""
    full = torch.bincount(labels)  # [C]
    kept = torch.bincount(labels[subset], minlength=len(full))  # [C]
    cut = torch.nonzero((kept == 1) & (full >= 2)).flatten()
    if len(cut):
        c = int(cut[torch.argmin(full[cut])])  # the smallest such class needs the most
        raise ConfigError(
            f"--label-fraction {spec.label_fraction:g} leaves 1 training sample of class {c} "
            f"(of its {int(full[c])}), but the fast probe picks its weight decay on a "
            f"validation split that needs 2 per class; use --label-fraction "
            f"{2 / int(full[c]):.2g} or more")


def _fast_probe_bar(progress: Progress | None) -> Callable[[int, int], None] | None:
    """The fast probe's L-BFGS fits (the weight-decay search, then the refit) as one bar."""
    if progress is None:
        return None
    return lambda done, total: progress("fast probe fits", done, total)


def _train_subset(spec: EvalSpec, labels: torch.Tensor) -> torch.Tensor | None:
    if spec.label_fraction >= 1.0:
        return None
    return stratified_subset(labels, spec.label_fraction, spec.seed)


def _frozen_feature_protocol(spec: EvalSpec, inputs: Inputs, device: torch.device,
                             precision: str, notes: list[str],
                             progress: Progress | None) -> Numbers:
    from evals.knn import knn_evaluate
    from evals.linear import fast_linear_probe

    if inputs.features is not None:
        if not is_main_process():  # every rank read the files; rank 0 runs the protocol
            return []
        f = inputs.features
        train_x, train_y, test_x, test_y = (f["train_features"], f["train_labels"],
                                            f["test_features"], f["test_labels"])
    else:
        got = {}
        for split, ds in (("train", inputs.train), ("test", inputs.test)):
            def bar(done: int, total: int, split: str = split) -> None:
                if progress is not None:
                    progress(f"features {split}", done, total)

            feats = features_for(inputs.source, ds, dataset_name=inputs.dataset, split=split,
                                 pool=spec.pool, device=device, precision=precision,
                                 cache_dir=Path(spec.cache_dir) if spec.cache_dir else None,
                                 use_cache=spec.use_cache, progress=bar)
            notes.append(f"{split} features [{feats.features.shape[0]} x "
                         f"{feats.features.shape[1]}]: "
                         f"{'cache' if feats.cached else 'extracted'} in {feats.seconds:.1f} s")
            got[split] = feats
        if not is_main_process():  # its part went to rank 0, which runs the protocol
            return []
        train_x, train_y = got["train"].features, got["train"].labels
        test_x, test_y = got["test"].features, got["test"].labels
    subset = _train_subset(spec, train_y)
    if subset is not None:
        if spec.protocol != "knn":
            _check_fraction_leaves_two(spec, torch.as_tensor(train_y), subset)
        train_x, train_y = train_x[subset], train_y[subset]
        notes.append(f"label fraction {spec.label_fraction}: {len(subset)} training samples")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    present = int(torch.as_tensor(train_y).unique().numel())
    if present < 2:
        notes.append(f"warning: the training set has {present} class: every prediction is "
                     "that class, so the accuracy says nothing about the encoder")
    numbers: Numbers = []
    if spec.protocol == "knn":
        n = int(train_x.shape[0])
        if max(spec.ks) > n:
            fraction = f" at --label-fraction {spec.label_fraction}" if subset is not None else ""
            raise ConfigError(f"--k {max(spec.ks)} is more neighbours than the {n} training "
                              f"images{fraction}; use --k values <= {n}, e.g. --k "
                              f"{min(10, n)}")
        res = knn_evaluate(train_x, train_y, test_x, test_y, ks=spec.ks,
                           temperature=spec.temperature, num_classes=num_classes)
        for k, accs in res.accuracy.items():
            for metric, value in accs.items():
                numbers.append((metric, value, {"k": k, "temperature": spec.temperature}))
        for metric, value in res.retrieval.items():
            cap = {"map_r_cap": res.map_r_cap} if metric == "map@r" and res.map_r_cap else {}
            numbers.append((metric, value, cap))
        notes.append(f"k-NN search ({res.backend}) over {train_x.shape[0]} x {test_x.shape[0]}: "
                     f"{res.search_seconds:.2f} s")
        return numbers
    res = fast_linear_probe(train_x, train_y, test_x, test_y, num_classes=num_classes,
                            seed=spec.seed, device=device,
                            progress=_fast_probe_bar(progress))
    notes.append(f"fast probe: lr {res['lr']:g}, weight decay {res['weight_decay']:g} chosen on a "
                 f"validation split of the training set (val top-1 {res['val_top1']:.2f})")
    knobs = {"probe": "fast", "chosen_lr": res["lr"], "chosen_weight_decay": res["weight_decay"]}
    return [(m, res[m], knobs) for m in ("top1", "top5")]


def _mae_linear(spec: EvalSpec, inputs: Inputs, device: torch.device, precision: str,
                notes: list[str], progress: Progress | None) -> Numbers:
    from evals.linear import linear_probe

    encoder = inputs.source.build(init_seed=spec.seed).to(device)
    subset = _train_subset(spec, inputs.train.labels)
    train_size = len(inputs.train) if subset is None else len(subset)
    recipe = probe_recipe(spec.recipe, train_size=train_size,
                          img_size=encoder.grid_size * encoder.patch_size, epochs=spec.epochs)
    recipe = dataclasses.replace(recipe, **{k: v for k, v in (
        ("batch_size", spec.batch_size), ("blr", spec.blr)) if v is not None})
    notes.append(f"linear probe recipe {recipe.name}: {recipe.optimizer}, {recipe.epochs} epochs "
                 f"at batch {recipe.batch_size}, blr {recipe.blr:g}"
                 + "".join(f"; {w}" for w in recipe.why))
    res = linear_probe(encoder, _in_memory(inputs.train), _in_memory(inputs.test),
                       pool=spec.pool, seed=spec.seed, device=device, precision=precision,
                       train_indices=subset, progress=_bar(progress, "linear probe"),
                       epochs=recipe.epochs, batch_size=recipe.batch_size, blr=recipe.blr,
                       warmup_epochs=recipe.warmup_epochs, optimizer=recipe.optimizer,
                       weight_decay=recipe.weight_decay, crop_scale=recipe.crop_scale,
                       hflip=0.0 if inputs.dataset in NO_FLIP else 0.5)
    knobs = {"probe": "mae", "recipe": recipe.name, "epochs": int(res["epochs"]),
             "probe_optimizer": recipe.optimizer, "batch_size": int(res["batch_size"]),
             "blr": recipe.blr, "probe_crop_min": recipe.crop_scale[0]}
    return [(m, res[m], knobs) for m in ("top1", "top5")]


def _from_scratch(spec: EvalSpec, source: EncoderSource | None) -> bool:
    """A fine-tune from random weights: ``--init random``, or the random reference (a random
    model whatever ``--init`` says). One rule for the recipe and for the rows."""
    return (spec.protocol in ("finetune", "partial-finetune") and source is not None
            and (spec.init == "random" or source.kind == "random"))


def finetune_spec_recipe(spec: EvalSpec, arch: str, img_size: int, train_size: int,
                         pretrained: bool) -> FinetuneRecipe:
    """The recipe an evaluation fine-tunes with: ``spec.recipe`` for this data and model, then
    every knob the spec sets explicitly."""
    recipe = finetune_recipe(spec.recipe, arch, img_size=img_size, train_size=train_size,
                             pretrained=pretrained, epochs=spec.epochs)
    overrides = {k: getattr(spec, k) for k in ("batch_size", "blr", "weight_decay",
                                               "layer_decay", "drop_path", "mixup", "cutmix",
                                               "label_smoothing", "head_bn", "erase")
                 if getattr(spec, k) is not None}
    if spec.rand_augment is not None:
        overrides["rand_augment"] = None if spec.rand_augment == "none" else spec.rand_augment
    if spec.crop_min is not None:
        overrides["crop_scale"] = (spec.crop_min, 1.0)
    return dataclasses.replace(recipe, **overrides)


def _finetune(spec: EvalSpec, inputs: Inputs, device: torch.device, precision: str,
              notes: list[str], progress: Progress | None) -> Numbers:
    from evals.finetune import finetune

    num_classes = int(max(inputs.train.labels.max(), inputs.test.labels.max())) + 1
    subset = _train_subset(spec, inputs.train.labels)
    train_size = len(inputs.train) if subset is None else len(subset)
    pretrained = not _from_scratch(spec, inputs.source)
    recipe = finetune_spec_recipe(spec, inputs.source.arch, inputs.source.img_size, train_size,
                                  pretrained)
    notes.append(f"fine-tuning recipe {recipe.name}: {recipe.epochs} epochs at batch "
                 f"{recipe.batch_size}, blr {recipe.blr:.3g}, layer decay {recipe.layer_decay:g}, "
                 f"Mixup {recipe.mixup:g} / CutMix {recipe.cutmix:g}, crops from "
                 f"{recipe.crop_scale[0]:g}" + "".join(f"; {w}" for w in recipe.why))
    model = inputs.source.build(global_pool="avg", num_classes=num_classes,
                                drop_path_rate=recipe.drop_path, init_seed=spec.seed,
                                pretrained=spec.init == "pretrained").to(device)
    blocks = spec.blocks if spec.protocol == "partial-finetune" else None
    if blocks is not None and blocks > len(model.blocks):
        raise ConfigError(f"--blocks {blocks} is more than the encoder's {len(model.blocks)} "
                          f"blocks; use 0..{len(model.blocks)}")
    hflip = 0.0 if inputs.dataset in NO_FLIP else 0.5
    res = finetune(model, _in_memory(inputs.train), _in_memory(inputs.test),
                   epochs=recipe.epochs, batch_size=recipe.batch_size, blr=recipe.blr,
                   lr=spec.lr, layer_decay=recipe.layer_decay, weight_decay=recipe.weight_decay,
                   warmup_epochs=recipe.warmup_epochs, min_lr=recipe.min_lr,
                   mixup=recipe.mixup, cutmix=recipe.cutmix,
                   label_smoothing=recipe.label_smoothing, crop_scale=recipe.crop_scale,
                   hflip=hflip, head_init_std=recipe.head_init_std, head_bn=recipe.head_bn,
                   erase=recipe.erase, rand_augment=recipe.rand_augment,
                   clip_grad=recipe.clip_grad,
                   partial_blocks=blocks, train_indices=subset, seed=spec.seed, device=device,
                   precision=precision, progress=_bar(progress, spec.protocol))
    knobs = {"init": "pretrained" if pretrained else "random", **recipe.knobs(),
             "epochs": int(res["epochs"]), "ft_hflip": hflip}
    if spec.lr is not None:
        knobs["ft_lr"] = spec.lr
    if blocks is not None:
        knobs["blocks"] = blocks
    return [(m, res[m], knobs) for m in ("top1", "top5")]


def _in_memory(dataset: AnyDataset) -> ArrayDataset:
    if not isinstance(dataset, ArrayDataset):
        raise DataError("training protocols (linear --probe mae, finetune) need a data set that "
                        "fits in memory; extract features and use knn / linear --probe fast")
    return dataset


def _bar(progress: Progress | None, what: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(what, done, total)


def _rows(spec: EvalSpec, inputs: Inputs, numbers: Numbers, seconds: float,
          identity: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per number. ``identity``: the resolved precision, attention kernel and
    ``eval_key`` (``eval_identity``); the ones that do not apply (None) are left out."""
    src = inputs.source
    common: dict[str, Any] = {
        "run_id": src.run_id if src is not None else f"features-{inputs.label}",
        "method": src.method if src is not None else "features",
        "arch": src.arch if src is not None else "-",
        "dataset": inputs.dataset,
        "protocol": spec.protocol,
        "checkpoint": src.label if src is not None else str(spec.features_dir),
        "eval_seconds": round(seconds, 3),
        "eval_seed": spec.seed,
    }
    if spec.protocol in ("knn", "linear", "fewshot") and src is not None and src.kind != "pixels":
        common["pool"] = spec.pool
    if spec.label_fraction < 1.0:
        common["label_fraction"] = spec.label_fraction
    if inputs.dataset in FOLDER_DATASETS and inputs.data_dir:
        # "imagefolder" names a format, not a data set: the folder is part of its identity,
        # so numbers on two folders are never averaged together.
        common["data_dir"] = inputs.data_dir
    # From random weights (--init random) a checkpoint lends only its architecture: the rows
    # are the random reference's, without its pretraining epochs, seconds or mask ratio.
    scratch = _from_scratch(spec, src) and src.kind in ("run", "official")
    if scratch:
        common |= {"method": "random", "seed": spec.seed}
    elif src is not None:
        common |= {k: v for k, v in src.pretrain.items() if k not in ("data_dir", "checkpoint")}
        if src.kind in REFERENCES:
            common["seed"] = spec.seed
    common.setdefault("seed", spec.seed)
    if spec.command:
        common["command"] = spec.command
    if src is not None and src.kind in ("run", "official") and not scratch:
        common["weights"] = src.fingerprint[:12]  # the encoder's identity: a hash of its weights
    data_px = inputs.train.info.img_size if inputs.train is not None else None
    if src is not None and src.img_size and data_px and src.img_size != data_px:
        common["img_size"] = src.img_size  # the images were resized to the encoder's input
    unreadable = sum(d.bad_images for d in (inputs.train, inputs.test) if d is not None)
    if unreadable:  # files the loader left out: the numbers are on fewer images
        common["skipped_images"] = unreadable
    common |= {name: value for name, value in identity.items() if value is not None}
    common |= spec.extra
    return [make_row(metric=metric, value=float(value), **(common | knobs))
            for metric, value, knobs in numbers]
