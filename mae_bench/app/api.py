"""The Python API: ``mae_bench.evaluate(encoder, ...)``, the rows ``mae-bench eval`` would append,
as a pandas DataFrame.

It builds the same ``EvalSpec`` the command line builds and runs it through the same
``run_eval``; only the encoder may also be a Python object (an ``nn.Module`` or a callable from
a normalised image batch [N, C, H, W] to embeddings [N, D]), resolved once for all protocols.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from evals.sources import SourceOptions, is_outside, object_source, resolve_source
from mae_bench.app.evaluation import PROBES, EvalSpec, Progress, run_eval, validate_spec
from mae_bench.errors import ConfigError, MaeBenchError

# EvalSpec fields the API sets itself (the others are keyword options of ``evaluate``).
_OWN = ("protocol", "checkpoint", "encoder", "features_dir", "dataset", "data_dir", "ks",
        "results_dir", "command")
F = TypeVar("F", bound=Callable[..., Any])


def api_errors(fn: F) -> F:
    """The messages of mae-bench's errors name command-line options (``--data-dir``); raised
    through the API they name its arguments (``data_dir=``) instead."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MaeBenchError as exc:
            raise type(exc)(api_message(str(exc))) from None
    return wrapper  # type: ignore[return-value]


@api_errors
def evaluate(encoder: Any, dataset: str | None = None, data_dir: str | Path | None = None,
             protocols: Sequence[str] = ("knn", "linear"), *, k: Sequence[int] = (10, 20, 100, 200),
             results_dir: str | Path | None = None,
             progress: bool | Progress = False, **options: Any) -> pd.DataFrame:
    """Evaluate an encoder with frozen-feature (or any) protocols; one row per number.

    Args:
        encoder: an ``nn.Module`` (timm's ``forward_features`` / ``forward_head`` are used where
            it has them; a timm-style ``pretrained_cfg`` dict declares its input size, channels
            and normalisation, else the data's own are used), a callable from images to
            features, or what ``--checkpoint`` takes: a run folder, an official MAE checkpoint,
            "pixels", "random", "timm:NAME", "hf:ID_OR_DIR", "hub:OWNER/REPO:ENTRY",
            "python:MODULE:CALLABLE".
        dataset: a registered data set name (default: a run's own pretraining data set, as
            ``mae-bench eval``; else digits).
        data_dir: where it lives (default: a run's own data folder for its own data set, else
            the registry's search path).
        protocols: any of knn, linear, fewshot (and finetune, partial-finetune for mae-bench
            encoders), run in this order.
        k: the k-NN neighbour counts.
        results_dir: also append the rows to this results store (default: write nothing).
        progress: True: progress bars on stderr (feature extraction, training epochs); or a
            callable ``(what, done, total)`` that receives the same reports; False: quiet.
        **options: any other ``EvalSpec`` field, as ``mae-bench eval`` names it with
            underscores: pool, weights, pretrained, img_size, arch, seed, device, precision,
            cache_dir, use_cache, label_fraction, probe, temperature, epochs, trust_checkpoint,
            trust_repo (``hub:`` repositories torch.hub does not trust yet), ...

    Returns:
        The rows, as the CLI appends them (``pandas.read_json(store, lines=True)`` shape);
        integer columns (``k``, ``epochs``, ...) are nullable integers where rows lack them.

    Raises:
        ConfigError, DataError, CheckpointError: bad input, with a one-line message.
    """
    fields = {f.name for f in dataclasses.fields(EvalSpec)} - set(_OWN)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    if isinstance(protocols, str):
        protocols = (protocols,)
    if not protocols:
        raise ConfigError("protocols is empty; give e.g. ('knn', 'linear')")
    named = isinstance(encoder, (str, Path))
    base = EvalSpec(protocol="knn", checkpoint=str(encoder) if named else None,
                    encoder=None if named else encoder, dataset=dataset,
                    data_dir=str(data_dir) if data_dir is not None else None, ks=tuple(k),
                    results_dir=str(results_dir) if results_dir is not None else None,
                    **options)
    specs = [dataclasses.replace(base, protocol=p) for p in protocols]
    for spec in specs:  # every protocol's options are checked before the first one runs
        validate_spec(spec)
    if not named or is_outside(encoder):  # built and loaded once, for all protocols
        source_options = SourceOptions(weights=base.weights, pretrained=base.pretrained,
                                       img_size=base.img_size, seed=base.seed,
                                       trust=base.trust_checkpoint, trust_repo=base.trust_repo)
        source = (resolve_source(str(encoder), source_options, arch=base.arch) if named
                  else object_source(encoder, source_options))
        specs = [dataclasses.replace(s, checkpoint=None, encoder=source, weights=None,
                                     pretrained=False) for s in specs]
    rows: list[dict[str, Any]] = []
    with _reports(progress) as report:
        for spec in specs:
            rows += run_eval(spec, report).rows
    return frame(rows)


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows as a DataFrame whose integer fields stay integers: a column of ints that some
    rows lack (``k``: only k-NN accuracy has it) is pandas' nullable Int64, not float64."""
    df = pd.DataFrame(rows)
    for column in df.columns:
        values = [r[column] for r in rows if r.get(column) is not None]
        if len(values) < len(rows) and values and \
                all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            df[column] = df[column].astype("Int64")
    return df


@contextmanager
def _reports(progress: bool | Progress) -> Iterator[Progress | None]:
    """``progress`` as run_eval's callback: a callable as it is; True: one rich bar per task on
    stderr (a notebook shows them too), removed when the evaluation ends."""
    if callable(progress):
        yield progress
        return
    if not progress:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars

    bars = Bars("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=Console(stderr=True))
    tasks: dict[str, Any] = {}

    def report(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bars.add_task(what, total=total)
        bars.update(tasks[what], completed=done, total=total)

    with bars:
        yield report


# What the CLI's options are called in the API: EvalSpec's fields, by their option names, plus
# the options named otherwise. A flag stands for its value (True, or False for --no-...).
_ARGS = {f"--{f.name.replace('_', '-')}": f.name for f in dataclasses.fields(EvalSpec)
         if f.name not in ("features_dir", "ks", "protocol", "checkpoint", "command", "extra")}
_ARGS |= {"--checkpoint": "encoder", "--k": "k", "--protocol": "protocols",
          "--smoothing": "label_smoothing", "--cache": "use_cache"}
_FLAGS = {"pretrained", "trust_checkpoint", "trust_repo", "use_cache", "head_bn", "force"}
_CHOICES = {"encoder": ("pixels", "random"), "probe": PROBES, "init": ("pretrained", "random"),
            "precision": ("auto", "bf16", "fp16", "fp32"), "device": ("auto", "cpu", "cuda")}
_OPTION = re.compile(r"--(no-)?([a-z][a-z0-9-]*)(?: ([^\s;,()]+))?")  # --name and what follows


def api_message(message: str) -> str:
    """A message in the API's words: ``--data-dir DIR`` -> ``data_dir=DIR``, ``--probe mae`` ->
    ``probe='mae'``, ``--trust-checkpoint`` -> ``trust_checkpoint=True``; options the API
    does not have stay as they are."""
    def words(m: re.Match[str]) -> str:
        negated, option, after = m.group(1), m.group(2), m.group(3)
        name = _ARGS.get(f"--{option}")
        if name is None:
            return m.group(0)
        if name in _FLAGS:
            return f"{name}={not negated}" + (f" {after}" if after else "")
        if after in _CHOICES.get(name, ()):
            return f"{name}={after!r}"
        if after is None or (after.isalpha() and after.islower()):  # prose follows
            return f"{name}=" + (f" {after}" if after else "")
        return f"{name}={after}"  # a number, a path, a placeholder (DIR, FILE, N)
    return _OPTION.sub(words, message)
