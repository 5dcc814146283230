"""The README table of this folder from its results store: k-NN top-1 (k = 20) and the fast
linear probe's top-1 per encoder, with the input size the images were resized to, the weights'
hash and the seconds each evaluation took.

    python results/outside-encoders-cifar10/table.py
"""

from pathlib import Path

import pandas as pd

rows = pd.read_json(Path(__file__).with_name("results.jsonl"), lines=True)
top1 = rows[(rows.metric == "top1") & ((rows.protocol != "knn") | (rows.k == 20))]
print("| encoder (`--checkpoint`) | input px | weights | k-NN top-1 (k = 20) | linear top-1 "
      "| seconds: k-NN (with extraction) / probe |")
print("|---|---|---|---|---|---|")
for checkpoint, group in top1.groupby("checkpoint", sort=False):
    knn = group[group.protocol == "knn"]
    lin = group[group.protocol == "linear"]
    size = group.img_size.dropna()
    name = "random --arch vit_mini_patch4" if checkpoint == "random" else checkpoint
    cells = [f"`{name}`", f"{int(size.iloc[0])}" if len(size) else "32 (own)",
             str(group.weights.iloc[0]) if group.weights.notna().any() else "- (seed 0)",
             f"{knn.value.iloc[0]:.2f}" if len(knn) else "-",
             f"{lin.value.iloc[0]:.2f}" if len(lin) else "-",
             " / ".join(f"{s:,.0f}" for s in pd.concat([knn, lin]).eval_seconds)]
    print("| " + " | ".join(cells) + " |")
