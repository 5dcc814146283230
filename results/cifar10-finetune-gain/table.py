"""The write-up's table from the rows in this folder's results.jsonl: per label fraction, k-NN
(k = 20) and the fast linear probe of the MAE encoder and of a random one, then fine-tuning from
MAE and from scratch (the same recipe), each as mean ± std (n) over seeds.

    python results/cifar10-finetune-gain/table.py [STORE]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from mae_bench.results import read_results

STORE = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent


def cell(values: pd.Series) -> str:
    v = values.dropna().tolist()
    if not v:
        return "-"
    mean = sum(v) / len(v)
    if len(v) == 1:
        return f"{mean:.2f} (n=1)"
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
    return f"{mean:.2f} ± {std:.2f} (n={len(v)})"


def main() -> None:
    df = read_results(STORE)
    df = df[(df["metric"] == "top1") & (df["status"] == "ok")]
    df = df.assign(fraction=df["label_fraction"].fillna(1.0))
    lines = ["| labels | k-NN k=20, MAE | k-NN, random | fast probe, MAE | fast probe, random "
             "| fine-tune from MAE | same recipe from scratch | gain |", "|" + "---|" * 8]
    for frac in sorted(df["fraction"].unique(), reverse=True):
        part = df[df["fraction"] == frac]

        def pick(method: str, protocol: str, part: pd.DataFrame = part, **knobs) -> pd.Series:
            rows = part[(part["method"] == method) & (part["protocol"] == protocol)]
            for k, v in knobs.items():
                rows = rows[rows[k] == v]
            return rows["value"]

        probe = "linear" if frac == 1.0 else "fewshot"
        ft_mae = pick("mae", "finetune", init="pretrained")
        ft_scratch = pick("random", "finetune")
        gain = (f"{ft_mae.mean() - ft_scratch.mean():+.2f}"
                if len(ft_mae) and len(ft_scratch) else "-")
        lines.append(f"| {frac:.0%} | {cell(pick('mae', 'knn', k=20))} | "
                     f"{cell(pick('random', 'knn', k=20))} | {cell(pick('mae', probe))} | "
                     f"{cell(pick('random', probe))} | **{cell(ft_mae)}** | {cell(ft_scratch)} | "
                     f"{gain} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
