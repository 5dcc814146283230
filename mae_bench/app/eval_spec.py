"""``EvalSpec``: one evaluation as the user asks for it, built once at the edge (the command line,
compare, sweep, the Python API) and run by ``mae_bench.app.evaluation.run_eval``.

Its fields are ``EvalTarget``'s (the encoder or features, the data, how and where to run and
record) and every registered protocol's knobs (``evals.protocols.knob_fields``). Each field
carries its command-line help and names in its metadata, so ``mae-bench eval``'s options are
generated from it. This module imports no torch: the command line reads it at start-up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.protocols import PROTOCOLS, knob_fields


def _opt(default: Any, help: str = "", **meta: Any) -> Any:
    """A field of the evaluation's own options (not a protocol's): its command-line help and
    names; ``cli=False`` for fields the command line does not set."""
    return field(default=default, metadata={"help": help, "cli": True} | meta)


@dataclass(frozen=True)
class EvalTarget:
    """What every evaluation names besides its protocol's knobs: the encoder (or features),
    the data, and how and where to run and record. With the protocols' knobs
    (``evals.protocols.knob_fields``) it makes ``EvalSpec``."""

    protocol: str = _opt(None, " | ".join(PROTOCOLS) + ".", required=True)
    checkpoint: str | None = _opt(
        None, "What to evaluate: a run folder or checkpoint file (mae-bench or an official "
        "MAE pretrain checkpoint), a reference: 'pixels' (raw pixels as features) or "
        "'random' (a random encoder of --arch), or an outside model on frozen features: "
        "timm:NAME (or a folder from mae-bench export --to timm), hf:ID_OR_DIR "
        "(transformers; pip install 'mae-bench[hf]'), hub:OWNER/REPO:ENTRY (torch.hub), "
        "python:MODULE:CALLABLE (returns an nn.Module). Outside models are resized, "
        "channel-matched and normalised as they declare.")
    weights: str | None = _opt(
        None, "timm: / hub: / python: models: load this state dict (.safetensors, .pth, .bin; "
        "or one under a 'model' / 'state_dict' key); every key must fit.", cli_type=Path)
    pretrained: bool = _opt(
        False, "timm: models: timm's own pretrained weights (needs a network or timm's cache; "
        "without it the model is randomly initialised, seeded by --seed).",
        flags=("--pretrained",))
    features_dir: str | None = _opt(
        None, "Instead of --checkpoint: a folder of precomputed embeddings (train_features.npy, "
        "train_labels.npy, test_features.npy, test_labels.npy).", flags=("--features",),
        cli_type=Path)
    # The Python API's encoder: an nn.Module, a callable from images to features, or a resolved
    # EncoderSource (instead of checkpoint).
    encoder: Any = _opt(None, cli=False)
    arch: str | None = _opt(
        None, "Architecture of the 'random' encoder (a ViT preset, resnet18/34/50 or "
        "timm:NAME); for a checkpoint, the expected one.")
    dataset: str | None = _opt(None, "Evaluation data set (default: the run's, else digits).")
    data_dir: str | None = _opt(None, "Where the data set lives.", cli_type=Path)
    pool: str | None = _opt(
        None, "Frozen features: cls (normed cls token) | mean (patch tokens; a ResNet's or other "
        "CNN's global average pool, its only one) | model (an outside model's, or a timm "
        "transformer backbone's, own pooled output). Default: cls for mae-bench ViTs, mean for "
        "CNNs, model for outside ones that have it.")
    img_size: int | None = _opt(
        None, "Input size in pixels of the random reference (default: the data's own, e.g. an "
        "image folder's detected size) or of an outside model (default: its own; a timm ViT's "
        "position embedding is resampled); images are resized to it.")
    seed: int = _opt(0, "Seeds probes, subsets, and the 'random' encoder.")
    device: str = _opt("auto", "auto | cpu | cuda.")
    precision: str = _opt("auto", "auto | bf16 | fp16 | fp32 (auto: bf16 where it is fast).")
    results_dir: str | None = _opt(
        "results", "Results store: rows are appended to DIR/results.jsonl.", cli_type=Path,
        cli_default=Path("results"))  # None: return the rows without writing them
    cache_dir: str | None = _opt(
        None, "Feature cache (default $MAE_BENCH_CACHE or ~/.cache/mae-bench).", cli_type=Path)
    use_cache: bool = _opt(True, "Reuse cached features.", flags=("--cache/--no-cache",))
    # Run an evaluation already in the store again; its rows supersede the old ones.
    force: bool = _opt(
        False, "Run an evaluation that is already in the results store again (same encoder, "
        "data, options, seed and precision; otherwise it is skipped); its new rows replace the "
        "old ones.", flags=("--force",))
    trust_checkpoint: bool = _opt(
        False, "Allow unpickling a checkpoint that is not plain tensors (only for files you "
        "trust: unpickling can run code).", flags=("--trust-checkpoint",))
    trust_repo: bool = _opt(
        False, "hub: models: run the code of a GitHub repository that torch.hub does not trust "
        "yet (torch then adds it to its trusted list). hub: and python: sources run their code.",
        flags=("--trust-repo",))
    command: str | None = _opt(None, cli=False)  # the command line that asked, for its rows
    extra: dict[str, Any] = field(default_factory=dict,  # more fields for every row (sweeps)
                                  metadata={"cli": False})


def _copy(f: dataclasses.Field[Any]) -> tuple[str, Any, dataclasses.Field[Any]]:
    kept = {} if f.default_factory is dataclasses.MISSING else {
        "default_factory": f.default_factory}
    if f.default is not dataclasses.MISSING:
        kept["default"] = f.default
    return f.name, f.type, field(metadata=f.metadata, **kept)


# One evaluation, as the user asked for it (built once at the edge, by the CLI, compare, sweep
# or the API): EvalTarget's fields, then every protocol's knobs, each once. A knob added to a
# protocol's Options is a field here, an option of ``mae-bench eval`` and an API keyword.
EvalSpec = dataclasses.make_dataclass(
    "EvalSpec",
    [(f.name, f.type, field(metadata=f.metadata)) if f.name == "protocol" else _copy(f)
     for f in (*dataclasses.fields(EvalTarget), *knob_fields())],
    frozen=True,
    namespace={"__doc__": "One evaluation, as the user asked for it: what ``EvalTarget`` "
               "names plus every protocol's knobs (``evals.protocols.knob_fields``)."})
EvalSpec.__module__ = __name__


