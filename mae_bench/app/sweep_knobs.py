"""The knobs ``mae-bench sweep`` can vary: how a value is parsed and checked, where it goes in
the run config, and which results-store column carries it (the report plots against that
column).

MAE's paper ablates each of these (Table 1 and Fig. 5 of He et al. 2021): the mask ratio, the
decoder's depth and width, the mask sampling strategy, the reconstruction target
(``norm_pix_loss``), mask tokens in the encoder (Table 1c) and the schedule length;
``method`` is what ``mae-bench compare`` varies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mae_bench.errors import ConfigError
from mae_bench.models.masking import MASK_STRATEGIES


@dataclass(frozen=True)
class SweepKnob:
    """One sweepable knob.

    Attributes:
        name: the CLI name (``mask-ratio``).
        column: the results-store column that holds the value (``mask_ratio``).
        section / key: where the value goes in ``RunConfig`` (``mae`` / ``mask_ratio``).
        parse: text -> value; raises ConfigError naming the bad text.
        numeric: plotted on a numeric axis (else one bar per value).
        also: further keys of ``section`` that the value sets (``target-scale`` 0.15-0.2 sets
            I-JEPA's smallest and largest target block); the value is then a tuple, one item
            per key, ``key`` first.

    Which methods have the knob is the methods' own word (``Method.own_knobs``), see
    ``check_method_has``.
    """

    name: str
    column: str
    section: str
    key: str
    parse: Callable[[str], Any]
    numeric: bool
    also: tuple[str, ...] = ()

    def assign(self, value: Any) -> dict[str, dict[str, Any]]:
        """The ``RunConfig.replace`` arguments that set ``value``."""
        if not self.also:
            return {self.section: {self.key: value}}
        return {self.section: dict(zip((self.key, *self.also), value, strict=True))}

    def label(self, value: Any) -> Any:
        """The value as the results' column holds it (a range as text: ``0.15-0.2``)."""
        return "-".join(f"{v:g}" for v in value) if self.also else value

    @property
    def field(self) -> str:
        """The config field it sets, as methods name it in ``own_knobs`` (``mae.mask_ratio``)."""
        return f"{self.section}.{self.key}"


def _float_in(low: float, high: float, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{what} must be a number, got '{text}'") from None
        if not low < value < high:
            raise ConfigError(f"{what} must be in ({low:g}, {high:g}), got {text}")
        return value
    return parse


def _positive_int(what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{what} must be a whole number, got '{text}'") from None
        if value < 1:
            raise ConfigError(f"{what} must be >= 1, got {text}")
        return value
    return parse


def _positive_float(what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{what} must be a number, got '{text}'") from None
        if not value > 0:
            raise ConfigError(f"{what} must be > 0, got {text}")
        return value
    return parse


def _scale_range(what: str) -> Callable[[str], tuple[float, float]]:
    """``0.15-0.2`` (a range) or ``0.2`` (one fixed scale) -> (low, high), both in (0, 1)."""
    def parse(text: str) -> tuple[float, float]:
        low_text, sep, high_text = text.partition("-")
        try:
            low, high = float(low_text), float(high_text if sep else low_text)
        except ValueError:
            raise ConfigError(f"{what} must be a fraction or a range like 0.15-0.2, "
                              f"got '{text}'") from None
        if not 0 < low <= high < 1:
            raise ConfigError(f"{what} must lie in (0, 1) with the low end first, got {text}")
        return low, high
    return parse


def _choice(choices: tuple[str, ...], what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ConfigError(f"unknown {what} '{text}'; valid: {', '.join(choices)}")
        return text
    return parse


def _bool(what: str) -> Callable[[str], bool]:
    truth = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}

    def parse(text: str) -> bool:
        if text.lower() not in truth:
            raise ConfigError(f"{what} must be true or false, got '{text}'")
        return truth[text.lower()]
    return parse


def _method(text: str) -> str:
    from mae_bench.methods.registry import method_class

    method_class(text)  # raises ConfigError listing the valid names
    return text


SWEEP_KNOBS: dict[str, SweepKnob] = {k.name: k for k in (
    SweepKnob("mask-ratio", "mask_ratio", "mae", "mask_ratio",
              _float_in(0.0, 1.0, "mask-ratio values"), numeric=True),
    SweepKnob("decoder-depth", "decoder_depth", "model", "decoder_depth",
              _positive_int("decoder-depth values"), numeric=True),
    SweepKnob("decoder-dim", "decoder_dim", "model", "decoder_embed_dim",
              _positive_int("decoder-dim values"), numeric=True),
    SweepKnob("mask-strategy", "mask_strategy", "mae", "mask_strategy",
              _choice(tuple(MASK_STRATEGIES), "mask strategy"), numeric=False),
    SweepKnob("norm-pix-loss", "norm_pix_loss", "mae", "norm_pix_loss",
              _bool("norm-pix-loss values"), numeric=False),
    # Table 1c: mask tokens in the encoder (every token encoded) against MAE's visible-only one.
    SweepKnob("encoder-mask-tokens", "encoder_mask_tokens", "mae", "encoder_mask_tokens",
              _bool("encoder-mask-tokens values"), numeric=False),
    # the masked siblings' own (issue 31): SimMIM's mask unit, I-JEPA's targets, data2vec 2.0's
    # masks per image
    SweepKnob("mask-patch-size", "mask_patch_size", "mae", "mask_patch_size",
              _positive_int("mask-patch-size values"), numeric=True),
    SweepKnob("num-targets", "num_targets", "mae", "num_targets",
              _positive_int("num-targets values"), numeric=True),
    SweepKnob("target-scale", "target_scale", "mae", "target_scale_min",
              _scale_range("target-scale values"), numeric=False, also=("target_scale_max",)),
    SweepKnob("num-masks", "num_masks", "mae", "num_masks",
              _positive_int("num-masks values"), numeric=True),
    SweepKnob("epochs", "pretrain_epochs", "train", "epochs",
              _positive_float("epochs values"), numeric=True),
    SweepKnob("method", "method", "train", "method", _method, numeric=False),
)}


def check_method_has(knob: SweepKnob, method: str) -> None:
    """Refuse a knob that only other methods read (``Method.own_knobs``): every point would
    train the same run. Raises ConfigError naming the knob's methods."""
    from mae_bench.methods.registry import METHODS

    owners = [name for name, cls in METHODS.items()
              if knob.field in getattr(cls, "own_knobs", frozenset())]
    if owners and method not in owners:
        raise ConfigError(f"{knob.name} is a knob of {', '.join(owners)}; "
                          f"--method {method} does not have it")


def get_knob(name: str) -> SweepKnob:
    """The knob called ``name``. Raises ConfigError listing the valid names."""
    if name not in SWEEP_KNOBS:
        raise ConfigError(f"unknown sweep knob '{name}'; valid: {', '.join(SWEEP_KNOBS)}")
    return SWEEP_KNOBS[name]
