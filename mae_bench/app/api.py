"""The Python API: ``mae_bench.evaluate(encoder, ...)``, the rows ``mae-bench eval`` would append,
as a pandas DataFrame.

It builds the same ``EvalSpec`` the command line builds and runs it through the same
``run_eval``; only the encoder may also be a Python object (an ``nn.Module`` or a callable from
a normalised image batch [N, C, H, W] to embeddings [N, D]), resolved once for all protocols.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from evals.sources import SourceOptions, is_outside, object_source, resolve_source
from mae_bench.app.evaluation import EvalSpec, run_eval, validate_spec
from mae_bench.errors import ConfigError

# EvalSpec fields the API sets itself (the others are keyword options of ``evaluate``).
_OWN = ("protocol", "checkpoint", "encoder", "features_dir", "dataset", "data_dir", "ks",
        "results_dir", "command")


def evaluate(encoder: Any, dataset: str = "cifar10", data_dir: str | Path | None = None,
             protocols: Sequence[str] = ("knn", "linear"), *, k: Sequence[int] = (10, 20, 100, 200),
             results_dir: str | Path | None = None, **options: Any) -> pd.DataFrame:
    """Evaluate an encoder with frozen-feature (or any) protocols; one row per number.

    Args:
        encoder: an ``nn.Module`` (timm's ``forward_features`` / ``forward_head`` are used where
            it has them; a timm-style ``pretrained_cfg`` dict declares its input size, channels
            and normalisation, else the data's own are used), a callable from images to
            features, or what ``--checkpoint`` takes: a run folder, an official MAE checkpoint,
            "pixels", "random", "timm:NAME", "hf:ID_OR_DIR", "hub:OWNER/REPO:ENTRY",
            "python:MODULE:CALLABLE".
        dataset: a registered data set name.
        data_dir: where it lives (default: the registry's search path).
        protocols: any of knn, linear, fewshot (and finetune, partial-finetune for mae-bench
            encoders), run in this order.
        k: the k-NN neighbour counts.
        results_dir: also append the rows to this results store (default: write nothing).
        **options: any other ``EvalSpec`` field, as ``mae-bench eval`` names it with
            underscores: pool, weights, pretrained, img_size, arch, seed, device, precision,
            cache_dir, use_cache, label_fraction, probe, temperature, epochs, ...

    Returns:
        The rows, as the CLI appends them (``pandas.read_json(store, lines=True)`` shape).

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
                                       trust=base.trust_checkpoint)
        source = (resolve_source(str(encoder), source_options, arch=base.arch) if named
                  else object_source(encoder, source_options))
        specs = [dataclasses.replace(s, checkpoint=None, encoder=source, weights=None,
                                     pretrained=False) for s in specs]
    rows: list[dict[str, Any]] = []
    for spec in specs:
        rows += run_eval(spec).rows
    return pd.DataFrame(rows)
