"""The protocol registry: one instance per protocol, by the name ``--protocol`` takes. A new
protocol is one file in this folder (a ``Protocol`` subclass, ``evals/protocol.py``) and one line
here."""

from __future__ import annotations

import dataclasses
from typing import Any

from evals.protocol import Protocol, check_name
from evals.protocols.fewshot import Fewshot
from evals.protocols.finetune import Finetune
from evals.protocols.knn import Knn
from evals.protocols.linear import Linear
from evals.protocols.partial_finetune import PartialFinetune

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Knn(),
    Linear(),
    Fewshot(),
    Finetune(),
    PartialFinetune(),
)}


def get_protocol(name: str) -> Protocol:
    """The registered protocol ``name``; an unknown one is a ConfigError listing the valid
    names."""
    return check_name(name, PROTOCOLS)


def headline(name: str, **given: Any) -> dict[str, Any]:
    """The row fields that pick the number of protocol ``name`` a one-column table shows
    (k-NN: ``{"k": 20}``), each replaced by a value ``given`` for it (a table's ``--k``); {}
    for a protocol with one number per metric, or one this version does not know (rows of an
    older store)."""
    protocol = PROTOCOLS.get(name)
    fields = protocol.headline if protocol is not None else {}
    return {column: given.get(column, value) for column, value in fields.items()}


def knob_fields() -> list[dataclasses.Field[Any]]:
    """Every protocol's knobs, each once, in registry order: the fields of ``mae-bench eval``'s
    generated options and of ``EvalSpec``. Two protocols that share a knob name share its
    field (from a common base class).

    Raises:
        TypeError: two protocols define a knob of the same name differently.
    """
    seen: dict[str, dataclasses.Field[Any]] = {}
    for protocol in PROTOCOLS.values():
        for f in dataclasses.fields(protocol.Options):
            old = seen.setdefault(f.name, f)
            if old is not f and (old.default, old.type, old.metadata.get("help")) != (
                    f.default, f.type, f.metadata.get("help")):
                raise TypeError(f"{protocol.name}: knob {f.name!r} differs from another "
                                "protocol's knob of that name; share one field")
    return list(seen.values())
