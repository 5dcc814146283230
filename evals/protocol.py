"""The Protocol contract: what every evaluation protocol (k-NN, the linear probes, few-shot,
fine-tuning, ...) is, so that the application layer runs them all the same way.

A protocol is a class with:

- ``name``: what ``--protocol`` takes; the registry (``evals/protocols/__init__.py``) maps names
  to instances, and an unknown name is an error listing the valid ones.
- ``Options``: a frozen dataclass of its knobs. Each field is made with ``knob(default, help,
  ...)``: its type, default, help text, command-line names and the one-line check of its value
  live on the field, so ``mae-bench eval``'s options, the Python API's keywords and
  ``--set PROTOCOL.KNOB=VALUE`` all come from it.
- ``validate(options)``: the checks that involve more than one knob, run once, before anything
  is loaded (each knob's own check runs when the options are built).
- ``frozen(options)``: whether it runs on frozen features (then outside encoders, the pixels
  reference and ``--features`` are accepted; a protocol that trains the encoder refuses them).
- ``run(options, context) -> Numbers``: the measurement, as (metric, value, knobs) triples; the
  application turns each into a result row.
- ``row_fields``, ``trains_from_scratch``, ``covers``: what it adds to every row, whether it
  starts from random weights, and whether stored rows already hold what is asked.
- ``few_shot``, ``headline``, ``trains_encoder``: what the tables and campaigns (compare,
  sweep, report) ask of it instead of comparing its name: whether it takes a label fraction
  below 1, which of its rows a one-column table shows, whether it trains the encoder.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

from mae_bench.errors import ConfigError, DataError

if TYPE_CHECKING:  # the command line builds its options from this module without torch
    import torch

    from evals.encoders import EncoderSource
    from mae_bench.data.datasets import AnyDataset, ArrayDataset

# A protocol's numbers: (metric, value, knobs for this number only).
Numbers = list[tuple[str, float, dict[str, Any]]]
Progress = Callable[[str, int, int], None]  # (what, done, total)
# Data sets whose classes change under a horizontal flip (digits, house numbers): their training
# views are not flipped.
NO_FLIP = frozenset(("digits", "mnist", "svhn"))


def knob(default: Any, help: str, *, flags: tuple[str, ...] = (),
         check: Callable[[Any], bool] | None = None,
         message: str | Callable[[Any], str] = "",
         cli_type: type | None = None, cli_default: Any = None,
         parse: Callable[[Any], Any] | None = None) -> Any:
    """A protocol knob: a dataclass field with its default and the metadata the command line
    and ``validate_knobs`` read.

    Args:
        default: the value when not given (None: the recipe's, or not used).
        help: the ``--help`` text.
        flags: the option's names (default ``--field-name``); a bool option ``--x/--no-x``.
        check: True for a valid value (None is always valid where the default is None).
        message: the error for an invalid value, formatted with ``{value}`` (or a function of
            the value).
        cli_type, cli_default, parse: where the command line takes another form than the
            field (``--k 10,20`` for a tuple): its type, default, and the conversion to the
            field's value.
    """
    meta = {"help": help, "flags": flags, "check": check, "message": message,
            "cli_type": cli_type, "cli_default": cli_default, "parse": parse}
    return field(default=default, metadata=meta)


def validate_knobs(values: Any) -> None:
    """Run the check of every knob field of ``values`` (a dataclass).

    Raises:
        ConfigError: the first invalid value, with the knob's message.
    """
    for f in dataclasses.fields(values):
        check = f.metadata.get("check")
        value = getattr(values, f.name)
        if check is not None and not (value is None and f.default is None) and not check(value):
            message = f.metadata["message"]
            raise ConfigError(message(value) if callable(message) else
                              message.format(value=value))


@dataclass(frozen=True)
class Knobs:
    """The knobs every protocol has (its ``Options`` derive from this)."""

    label_fraction: float = knob(
        1.0, "Train on a stratified, seeded fraction of the labels (few-shot).",
        check=lambda v: 0.0 < v <= 1.0, message="--label-fraction must be in (0, 1], got {value}")


@dataclass
class EvalInputs:
    """What one evaluation reads: the source and the two splits (or the source's features)."""

    source: EncoderSource
    dataset: str
    train: AnyDataset | None = None
    test: AnyDataset | None = None
    features: dict[str, torch.Tensor] | None = None
    label: str = ""
    data_dir: str | None = None  # where the data were read from (resolved)
    pool: str = "cls"  # the frozen features' pooling (--pool, else the encoder's own)

    @property
    def hflip(self) -> float:
        """The probability of flipping a training view (none where a flip changes the class)."""
        return 0.0 if self.dataset in NO_FLIP else 0.5

    def data_identity(self) -> list[Any]:
        """The data's part of an evaluation's ``eval_key``: the name, and where images were
        read, their folder and the content of both splits (precomputed features: their hash
        is in the source's part)."""
        if self.train is None or self.test is None:
            return [self.dataset]
        from evals.features import dataset_fingerprint

        return [self.dataset, self.data_dir, dataset_fingerprint(self.train),
                dataset_fingerprint(self.test)]

    def in_memory(self, split: str) -> ArrayDataset:
        """A split as the training protocols need it: images in memory."""
        from mae_bench.data.datasets import ArrayDataset

        dataset = self.train if split == "train" else self.test
        if not isinstance(dataset, ArrayDataset):
            raise DataError("training protocols (linear --probe mae, finetune) need a data set "
                            "that fits in memory; extract features and use knn / linear "
                            "--probe fast")
        return dataset


@dataclass
class EvalContext:
    """Everything a protocol's ``run`` reads besides its options: the inputs, where and how to
    run, and where to put notes and progress."""

    inputs: EvalInputs
    device: torch.device
    precision: str
    seed: int = 0
    cache_dir: Path | None = None
    use_cache: bool = True
    notes: list[str] = field(default_factory=list)
    progress: Progress | None = None

    def bar(self, what: str) -> Callable[[int, int], None] | None:
        """A progress callback (done, total) for one task, or None when nobody listens."""
        if self.progress is None:
            return None
        report = self.progress
        return lambda done, total: report(what, done, total)


class Protocol(abc.ABC):
    """One evaluation protocol (see the module docstring for the contract)."""

    name: ClassVar[str]
    Options: ClassVar[type[Knobs]]
    # How "use ..." messages name the protocol's frozen-feature form ("linear --probe fast"),
    # None for a protocol that always trains the encoder.
    frozen_usage: ClassVar[str | None] = None
    uses_pool: ClassVar[bool] = False  # its rows carry the frozen features' ``pool``
    # It measures on a fraction of the labels (--label-fraction below 1): a caller that holds
    # one label fraction for several protocols (compare, sweep) gives it to such a one only.
    few_shot: ClassVar[bool] = False
    # The row fields that pick the number a one-column table shows, where one evaluation gives
    # several of a metric (k-NN: one per neighbour count, k=20 shown unless a table says).
    headline: ClassVar[Mapping[str, Any]] = MappingProxyType({})

    @property
    def trains_encoder(self) -> bool:
        """Whether it always trains the encoder (it has no frozen-feature form): the pixels
        reference cannot take it, and its rows are told apart by their schedule and recipe."""
        return self.frozen_usage is None

    def options(self, values: Mapping[str, Any]) -> Any:
        """This protocol's options from ``values`` (a mapping holding at least its knobs, e.g.
        an EvalSpec's fields), each knob checked."""
        options = self.Options(**{f.name: values[f.name]
                                  for f in dataclasses.fields(self.Options) if f.name in values})
        validate_knobs(options)
        return options

    def validate(self, options: Any) -> None:
        """Checks across knobs, before anything is loaded (default: none)."""
        return None

    def frozen(self, options: Any) -> bool:
        """Whether it runs on frozen features with these options."""
        return self.frozen_usage is not None

    def describe(self, options: Any) -> str:
        """The protocol as a command line would name it ("linear --probe mae")."""
        return self.name

    def features_refusal(self, options: Any) -> str | None:
        """Why ``--features`` does not fit these options, where the protocol itself says so
        (None: the application's general message)."""
        return None

    def trains_from_scratch(self, options: Any, source: EncoderSource) -> bool:
        """Whether it trains from random weights (its rows are then the random reference's)."""
        return False

    def row_fields(self, options: Any, source: EncoderSource) -> dict[str, Any]:
        """Fields for every row of this protocol, besides each number's own knobs."""
        return {}

    def covers(self, options: Any, stored: Any) -> bool:
        """Whether the stored rows of the same evaluation (a DataFrame) hold all it would
        measure now (default: yes)."""
        return True

    @abc.abstractmethod
    def run(self, options: Any, context: EvalContext) -> Numbers:
        """Measure; under torchrun every rank calls it and only rank 0's numbers are kept."""


def train_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor | None:
    """The seeded, stratified training subset of ``--label-fraction`` (None: all)."""
    from evals.splits import stratified_subset

    return None if fraction >= 1.0 else stratified_subset(labels, fraction, seed)


def check_name(name: str, registry: Mapping[str, Protocol]) -> Protocol:
    """The registered protocol ``name``.

    Raises:
        ConfigError: an unknown name, listing the valid ones.
    """
    if name not in registry:
        raise ConfigError(f"unknown protocol {name!r}; valid: {', '.join(registry)}")
    return registry[name]
