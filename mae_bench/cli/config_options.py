"""Command-line options generated from the run config: one per ``RunConfig`` field, plus
``--set SECTION.KEY=VALUE`` for any field.

Each option's name, type, default and help come from the field (``mae_bench.config.KNOBS``, built
from the dataclasses and their ``metadata``), so a new knob is one field in ``config.py``. An
option is named after its field (``--decoder-embed-dim``); a field whose option had another name
before keeps it as a second name (``--decoder-dim``, from ``metadata["flag"]``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from mae_bench.config import KNOBS, Knob, RunConfig, knob_named, parse_assignment
from mae_bench.errors import ConfigError

SetOption = Annotated[
    list[str],
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Set any config field, e.g. --set ssl.teacher_temp=0.07 --set "
        "mae.norm_pix_loss=false (repeatable). VALUE is a YAML scalar (5, 1e-3, true, null); "
        "the keys are the fields of a run's config.yaml.",
    ),
]
_PARAM_SEP = "__"  # the Python name of a generated parameter: model__decoder_embed_dim


def param_name(knob: Knob) -> str:
    return f"{knob.section}{_PARAM_SEP}{knob.key}"


# The help panels of the generated options, in the order ``--help`` shows them: the everyday
# knobs first, then by what they tune; the on / off switches last and together, since their
# --no- column would narrow the help text of every other option of their panel (at 80 columns,
# to a few words a line). Each title names the config sections its fields come from
# (``--mask-ratio`` is ``mae.mask_ratio`` in a YAML file or ``--set``).
PANELS: dict[str, tuple[str, ...]] = {
    "Everyday (train., data., model.)": (
        "train.method", "data.dataset", "data.data_dir", "model.arch", "train.epochs",
        "train.batch_size", "train.device", "train.precision", "train.seed", "model.img_size",
        "train.init", "train.init_weights"),
    "MAE and its masked siblings (mae., model.)": (
        "mae.mask_ratio", "mae.mask_strategy", "model.decoder_embed_dim", "model.decoder_depth",
        "model.decoder_num_heads", "mae.mask_ratio_var", "mae.mask_patch_size",
        "mae.num_targets", "mae.target_scale_min", "mae.target_scale_max", "mae.num_masks",
        "mae.target_layers"),
    "Optimiser and schedule (train.)": (
        "train.blr", "train.lr", "train.lr_scaling", "train.lr_ref_batch", "train.min_lr",
        "train.weight_decay", "train.weight_decay_end", "train.warmup_epochs",
        "train.warmup_min_steps",
        "train.accum_iter", "train.clip_grad", "train.optimizer", "train.sgd_momentum",
        "train.lars_eta"),
    "SimCLR, MoCo v3, BYOL, DINO, iBOT (ssl.)": (
        "ssl.temperature", "ssl.proj_hidden_dim", "ssl.proj_dim", "ssl.momentum",
        "ssl.out_dim", "ssl.teacher_temp", "ssl.warmup_teacher_temp",
        "ssl.teacher_temp_warmup_epochs", "ssl.student_temp", "ssl.center_momentum",
        "ssl.center_init", "ssl.freeze_last_layer_epochs", "ssl.local_crops",
        "ssl.local_crop_size", "ssl.patch_out_dim", "ssl.patch_loss_weight",
        "ssl.teacher_patch_temp"),
    "Barlow Twins, VICReg (ssl.)": (
        "ssl.redundancy_weight", "ssl.invariance_weight", "ssl.variance_weight",
        "ssl.covariance_weight"),
    "SwAV, SimSiam, MoCo v2+, NNCLR (ssl.)": (
        "ssl.queue_size", "ssl.queue_start_epochs", "ssl.num_prototypes",
        "ssl.sinkhorn_iterations", "ssl.sinkhorn_epsilon", "ssl.pred_hidden_dim"),
    "Loading, logging, kernels (data., train.)": (
        "data.split", "data.num_workers", "data.pipeline", "data.shuffle_buffer",
        "train.log_every", "train.save_every",
        "train.attention", "train.conv", "train.online_every", "train.tracker"),
    "Switches (data., mae., model., ssl., train.)": (
        "data.stream", "mae.norm_pix_loss", "mae.encoder_mask_tokens", "model.cifar_stem",
        "ssl.norm_last_layer", "ssl.freeze_patch_embed", "ssl.head_output_bias",
        "ssl.stop_gradient", "ssl.shared_head", "train.lars_clip_lr", "train.deterministic",
        "train.online_eval", "train.stop_on_collapse"),
}
_PANEL_OF = {name: panel for panel, fields in PANELS.items() for name in fields}
_ORDER = {name: i for i, name in enumerate(_PANEL_OF)}


def _panel(knob: Knob) -> str:
    """A field's panel; a field added to config.py but not to ``PANELS`` still gets one."""
    return _PANEL_OF.get(knob.name, f"More ({knob.section}.)")


def _shown(knob: Knob) -> str:
    if knob.value_type is bool:
        return knob.flags[0] if knob.default else "--no-" + knob.flags[0][2:]
    return f"{knob.default:g}" if isinstance(knob.default, float) else str(knob.default)


def field_option(name: str, panel: str | None = None, default_in_help: bool = False) -> Any:
    """The typer option of the field ``section.key``: its names and help. Compare and sweep use
    it for their options that mean the same as a field; where such an option's own default is
    None (the field's default applies), ``default_in_help`` shows the field's default."""
    knob = knob_named(name)
    decls = ([f"{f}/--no-{f[2:]}" for f in knob.flags] if knob.value_type is bool
             else list(knob.flags))
    text = knob.help
    if default_in_help and knob.default is not None:
        text += f" Default: {_shown(knob)}."
    return typer.Option(*decls, help=text, rich_help_panel=panel)


def _parameter(knob: Knob) -> inspect.Parameter:
    """A generated parameter, with the field's default (shown in the help). Only a value given
    on the command line counts: the wrapper of ``with_config_options`` turns the others into
    None, so the config (defaults, or --config) keeps its value."""
    return inspect.Parameter(param_name(knob), inspect.Parameter.KEYWORD_ONLY,
                             default=knob.default,
                             annotation=Annotated[knob.value_type,
                                                  field_option(knob.name, _panel(knob))])


_CONTEXT = "cli_context"  # the typer.Context parameter the wrapper adds


def with_config_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` one option per ``RunConfig`` field; it receives them in its
    ``**knobs`` (``{"train__epochs": 5.0, ...}``), None where not given on the command line."""
    sig = inspect.signature(command, eval_str=True)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    generated = [_parameter(k) for k in sorted(KNOBS, key=lambda k: _ORDER.get(k.name, 1 << 30))]
    clash = {p.name for p in own} & {p.name for p in generated} or (
        {f for p in own for f in _flags(p)} & {f for k in KNOBS for f in k.flags})
    if clash:
        raise TypeError(f"{command.__name__}: options {sorted(clash)} are also config fields")
    names = [p.name for p in generated]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        ctx = kwargs.pop(_CONTEXT)
        for name in names:  # a default (not typed by the user) must not override --config
            source = ctx.get_parameter_source(name)
            if getattr(source, "name", "DEFAULT") not in ("COMMANDLINE", "ENVIRONMENT"):
                kwargs[name] = None
        return command(**kwargs)

    context = inspect.Parameter(_CONTEXT, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=typer.Context)
    wrapper.__signature__ = sig.replace(parameters=[context, *own, *generated])  # for typer
    return wrapper


def _flags(param: inspect.Parameter) -> list[str]:
    infos = getattr(param.annotation, "__metadata__", ())
    decls = [d for info in infos for d in (getattr(info, "param_decls", None) or ())]
    return [f for d in decls for f in d.split("/")] or ["--" + param.name.replace("_", "-")]


def config_from_options(base: RunConfig, knobs: Mapping[str, Any],
                        sets: Sequence[str] | None) -> RunConfig:
    """``base`` with the generated options that were given (not None) and every ``--set``.

    Raises:
        ConfigError: a --set that does not parse or fit its field, or one field given twice
            with different values (``--epochs 5 --set train.epochs=6``).
    """
    values: dict[str, Any] = {}
    given: dict[str, str] = {}  # field -> how it was given, for the error message
    for param, value in knobs.items():
        if value is not None:
            knob = knob_named(param.replace(_PARAM_SEP, ".", 1))
            values[knob.name], given[knob.name] = value, f"{knob.flags[0]} {value}"
    for text in sets or []:
        name, value = parse_assignment(text)
        if name in values and values[name] != value:
            raise ConfigError(f"{name} is given twice ({given[name]} and --set {text}); "
                              "give it once")
        values[name], given[name] = value, f"--set {text}"
    return base.override(values)


def overrides(config: Path | None, sets: Sequence[str] | None,
              own_options: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The extra pretraining settings of compare and sweep: --config, then --set, as the plain
    dict their specs take ({} when neither is given). A --set of a field the command sets
    with an option of its own (``own_options``: field -> option) is refused, naming the
    option, since the command's option would win."""
    for text in sets or []:
        name = parse_assignment(text)[0]
        if name in own_options:
            raise ConfigError(f"--set {text}: {name} is set by {own_options[name]} here "
                              "(it would win over --set); use that")
    if config is None and not sets:
        return {}
    base = RunConfig.from_yaml(config) if config is not None else RunConfig()
    return config_from_options(base, {}, sets).to_dict()


# --- options from any dataclass's fields (``mae-bench eval``: EvalSpec) ------------------------


def field_parameter(f: Any) -> inspect.Parameter:
    """The typer parameter of a dataclass field that carries ``metadata["help"]``: named after
    the field (``--batch-size``) or ``metadata["flags"]``; typed and defaulted as the field, or
    as ``metadata["cli_type"]`` / ``["cli_default"]`` where the command line takes another form
    (a path, ``--k 10,20``). A field without a default is a required option."""
    import dataclasses

    meta = f.metadata
    value_type = meta.get("cli_type") or _plain_type(f.type)
    decls = list(meta.get("flags") or ()) or ["--" + f.name.replace("_", "-")]
    if value_type is bool and "/" not in decls[0] and f.default is None:
        decls = [f"{decls[0]}/--no-{decls[0][2:]}"]
    default = meta.get("cli_default")
    if default is None:
        default = f.default if f.default is not dataclasses.MISSING else ...
    if meta.get("required"):
        default = ...
    option = typer.Option(*decls, help=meta.get("help") or None)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[value_type, option])


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _plain_type(annotation: Any) -> type:
    """``int | None`` (as a string under ``from __future__ import annotations``) -> int."""
    if isinstance(annotation, type):
        return annotation
    first = str(annotation).split("|")[0].strip()
    return _TYPES.get(first, str)


Command = Callable[..., None]


def with_field_options(fields: Sequence[Any]) -> Callable[[Command], Command]:
    """Give a command one option per field (those whose ``metadata.get("cli", True)``); it
    receives them in its ``**options`` as typed (before any ``metadata["parse"]``)."""
    generated = [field_parameter(f) for f in fields if f.metadata.get("cli", True)]

    def wrap(command: Callable[..., None]) -> Callable[..., None]:
        sig = inspect.signature(command, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        clash = {p.name for p in own} & {p.name for p in generated}
        if clash:
            raise TypeError(f"{command.__name__}: options {sorted(clash)} are also fields")

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            return command(**kwargs)

        required = [p for p in generated if p.default is ...]
        rest = [p for p in generated if p.default is not ...]
        wrapper.__signature__ = sig.replace(parameters=[*required, *own, *rest])  # for typer
        return wrapper
    return wrap
