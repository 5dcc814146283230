"""Pretraining as the application runs it: the one entry that ``mae-bench pretrain``, ``compare``
and ``sweep`` share, and the one writer of the rows that record a run stopped by an error.

``pretrain_run`` trains (or resumes) a run folder through the engine. A pretraining stopped by a
``TrainingError`` (a non-finite loss) is recorded in the results store as a ``failed`` row, so
that tables and reports show the run as failed instead of silently missing, and then raised as
``PretrainingFailed``: the caller decides whether its campaign goes on (compare, sweep) or the
command ends (pretrain). ``failure_rows`` builds every failed row a command writes: the
pretraining's own (protocol ``pretrain``) and a sweep point's (one per protocol left without
numbers).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console

from evals.encoders import hash_state, load_source
from evals.online import OnlineMonitor, has_labels
from evals.sources import SourceOptions, resolve_source
from mae_bench.app.export import vit_state_from_hf
from mae_bench.config import RunConfig
from mae_bench.data import available_splits
from mae_bench.errors import ConfigError, TrainingError
from mae_bench.methods import engine
from mae_bench.methods.engine import EncoderInit, PretrainResult
from mae_bench.methods.registry import method_class, resolve_config
from mae_bench.models.backbones import is_vit
from mae_bench.models.vit import get_preset
from mae_bench.results import append_rows, make_row
from mae_bench.training.checkpoint import CheckpointSaveError, find_checkpoint
from mae_bench.training.distributed import is_main_process

PRETRAIN = "pretrain"  # the protocol of a pretraining's own row


class PretrainingFailed(TrainingError):
    """A pretraining stopped by ``error`` (kept, with its step and label); ``recorded`` is the
    results file its failed row went to, None when it was not recorded (no store given, a
    torchrun process other than rank 0, or a full disk, which would refuse the row too)."""

    def __init__(self, error: TrainingError, recorded: Path | None) -> None:
        note = f" (recorded as a failed row in {recorded})" if recorded is not None else ""
        super().__init__(f"{error}{note}", error.step)
        self.error, self.recorded = error, recorded
        self.label = getattr(error, "label", "training stopped: ")  # how the CLI prints it


def pretrain_run(cfg: RunConfig, run_dir: str | Path, *, results_dir: str | Path | None,
                 max_steps: int | None = None, progress: bool = True,
                 console: Console | None = None) -> PretrainResult:
    """Pretrain (or resume) ``cfg`` in ``run_dir`` (``mae_bench.methods.engine.pretrain``).

    Args:
        results_dir: the store where a stopped pretraining is recorded as a failed row; None:
            not recorded here (the caller records its own rows).
        max_steps, progress, console: as ``engine.pretrain``.

    Raises:
        PretrainingFailed: a ``TrainingError`` stopped the run (recorded, see above).
        ConfigError / DataError: bad configuration or data (nothing is written).
    """
    monitor = online_monitor(cfg)  # before anything is written: bad data is one line
    # a resumed run has its weights (its --init source may be gone): resolved for a new run only
    init = encoder_init(cfg) if find_checkpoint(Path(run_dir)) is None else None
    try:
        return engine.pretrain(cfg, run_dir, max_steps=max_steps, progress=progress,
                               console=console, monitor=monitor, init=init)
    except TrainingError as err:
        recorded = None
        if results_dir is not None and is_main_process() and not isinstance(
                err, CheckpointSaveError):  # a full disk: the row could not be written either
            recorded = append_rows(results_dir, failure_rows(
                resolve_config(cfg), Path(run_dir), str(err), step=err.step,
                fields={"pretrain_epochs": cfg.train.epochs}))
        raise PretrainingFailed(err, recorded) from None


def encoder_init(cfg: RunConfig) -> EncoderInit | None:
    """``--init`` resolved into the tensors the encoder starts from, by the loaders of
    ``eval --checkpoint``: a mae-bench run folder or checkpoint and an official MAE checkpoint
    give their encoder's weights; ``timm:NAME`` (only with ``--arch timm:NAME``) the timm
    model's, from ``--init-weights FILE`` or timm's download; ``hf:ID_OR_DIR`` a transformers
    ViT / ViTMAE's, renamed to a ViT preset's keys (``export --to hf`` in reverse).

    Raises:
        ConfigError / CheckpointError: a source that cannot be read, or another architecture.
    """
    t = cfg.train
    if t.init is None:
        return None
    if t.init.startswith("timm:"):
        if cfg.model.arch != t.init:
            raise ConfigError(f"--init {t.init} needs --arch {t.init} (the same timm model); "
                              f"got --arch {cfg.model.arch}")
        source = resolve_source(t.init, SourceOptions(weights=t.init_weights,
                                                      pretrained=t.init_weights is None))
        state = {f"model.{k}": v for k, v in source.encoder.model.state_dict().items()}
    elif t.init.startswith("hf:"):
        if not is_vit(cfg.model.arch):
            raise ConfigError(f"--init {t.init}: a Hugging Face ViT / ViTMAE fits a ViT preset "
                              f"(--arch vit_...); got --arch {cfg.model.arch}")
        source = resolve_source(t.init, SourceOptions())
        hf = source.encoder.model.state_dict()
        try:
            state = vit_state_from_hf(hf, get_preset(cfg.model.arch).depth)
        except ConfigError as exc:
            raise ConfigError(f"--init {t.init} does not fit --arch {cfg.model.arch}: {exc}") \
                from None
    else:
        source = load_source(t.init)
        if source.state is None:
            raise ConfigError(f"--init {t.init}: no weights to start from (give a run folder, "
                              "a checkpoint file or timm:NAME)")
        state = source.state
    state = {k: v.detach().clone() for k, v in state.items()}
    return EncoderInit(t.init, state, hash_state(state))


def online_monitor(cfg: RunConfig) -> OnlineMonitor | None:
    """The run's online evaluation (``evals/online.py``): on where the data has labelled train
    and test splits (an image folder: found on disk) unless ``--no-online-eval``; asked for on
    data without them, an error. Nothing is decoded here (the monitor reads its splits once
    the run's checks have passed).

    Raises:
        ConfigError: ``--online-eval`` on data without a labelled test split.
    """
    t = cfg.train
    if t.online_eval is False:
        return None
    if not has_labels(cfg):  # e.g. an image folder without test/: none, unless asked for
        if t.online_eval:
            found = available_splits(cfg.data.dataset, cfg.data.data_dir)
            raise ConfigError(f"--online-eval needs labelled train and test splits; "
                              f"{cfg.data.dataset} has {', '.join(found) or 'none readable'}")
        return None
    return OnlineMonitor(cfg, every=t.online_every)


def failure_rows(cfg: RunConfig, run_dir: Path, error: str, *,
                 protocols: Iterable[str] = (PRETRAIN,), step: int | None = None,
                 fields: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The ``failed`` rows of a run stopped by ``error``: one per protocol it leaves without
    numbers (``pretrain``: the training itself, metric ``loss``; an evaluation: ``top1``).

    Each row carries the run's seed and folder name (``checkpoint``, also its ``run_id``),
    ``fields`` (a sweep's knob, the planned epochs), the method's own knobs
    (``Method.row_fields``: MAE's ``mask_ratio``) where ``fields`` does not set them, and the
    ``step`` the error names, when known.
    """
    extra: dict[str, Any] = {"seed": cfg.train.seed, "checkpoint": run_dir.name,
                             **(fields or {})}
    if step is not None:
        extra["step"] = step
    if cfg.train.init is not None:  # started from earlier or outside weights (--init)
        extra["pretrain_init"] = cfg.train.init
    extra = method_class(cfg.train.method).row_fields(cfg) | extra
    return [make_row(run_id=run_dir.name, method=cfg.train.method, arch=cfg.model.arch,
                     dataset=cfg.data.dataset, protocol=protocol,
                     metric="loss" if protocol == PRETRAIN else "top1", value=None,
                     status="failed", error=error, **extra)
            for protocol in protocols]
