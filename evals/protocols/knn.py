"""k-NN on frozen features (DINO's weighted vote, one search for every k), plus retrieval."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from evals.protocol import EvalContext, Knobs, Numbers, Protocol, knob
from mae_bench.errors import ConfigError, MaeBenchError


def int_list(text: str | tuple[int, ...]) -> tuple[int, ...]:
    """``--k 10,20`` -> (10, 20)."""
    if not isinstance(text, str):
        return tuple(text)
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MaeBenchError(f"--k takes comma-separated integers, got {text!r}") from None


@dataclass(frozen=True)
class KnnOptions(Knobs):
    ks: tuple[int, ...] = knob(
        (10, 20, 100, 200), "k-NN: neighbour counts, one search for all.", flags=("--k",),
        check=lambda v: len(v) > 0 and all(k >= 1 for k in v),
        message=lambda v: f"--k needs positive neighbour counts, got "
                          f"{','.join(map(str, v)) or 'none'}", cli_type=str,
        cli_default="10,20,100,200", parse=int_list)
    temperature: float = knob(0.07, "k-NN: vote weight exp(sim / T) (DINO: 0.07).",
                              check=lambda v: v > 0,
                              message="--temperature must be > 0, got {value}")


class Knn(Protocol):
    name = "knn"
    Options = KnnOptions
    frozen_usage = "knn"
    uses_pool = True
    headline = MappingProxyType({"k": 20})  # DINO's and the MAE paper's tables

    def covers(self, options: KnnOptions, stored: Any) -> bool:
        # more neighbour counts asked for: run it; the repeated ks supersede
        return set(options.ks) <= set(stored["k"].dropna().astype(int))

    def run(self, options: KnnOptions, context: EvalContext) -> Numbers:
        from evals.frozen import frozen_splits
        from evals.knn import knn_evaluate

        splits = frozen_splits(context, options.label_fraction)
        if splits is None:
            return []
        n = int(splits.train_x.shape[0])
        if max(options.ks) > n:
            fraction = (f" at --label-fraction {options.label_fraction}"
                        if splits.subset is not None else "")
            raise ConfigError(f"--k {max(options.ks)} is more neighbours than the {n} training "
                              f"images{fraction}; use --k values <= {n}, e.g. --k "
                              f"{min(10, n)}")
        res = knn_evaluate(splits.train_x, splits.train_y, splits.test_x, splits.test_y,
                           ks=options.ks, temperature=options.temperature,
                           num_classes=splits.num_classes)
        numbers: Numbers = []
        for k, accs in res.accuracy.items():
            for metric, value in accs.items():
                numbers.append((metric, value, {"k": k, "temperature": options.temperature}))
        for metric, value in res.retrieval.items():
            cap = {"map_r_cap": res.map_r_cap} if metric == "map@r" and res.map_r_cap else {}
            numbers.append((metric, value, cap))
        context.notes.append(f"k-NN search ({res.backend}) over {splits.train_x.shape[0]} x "
                             f"{splits.test_x.shape[0]}: {res.search_seconds:.2f} s")
        return numbers
