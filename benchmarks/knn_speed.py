"""k-NN search speed: FAISS (``evals.knn.knn_evaluate``) against a plain torch brute force
(``evals.knn.knn_torch``) on the same synthetic features, alternating the two
(``mae_bench.app.speed_eval.knn_speed``, as ``mae-bench speed`` does), and the time of the
similarity matmul itself: the floor any exact search pays.

    python benchmarks/knn_speed.py --train 50000 --test 10000 --dim 192 --repeats 2
    python benchmarks/knn_speed.py --retrieval   # also recall@K and mAP@R (search_k 1000)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evals.knn import DEFAULT_KS
from mae_bench.app.speed_eval import knn_speed, synthetic_features


def matmul_seconds(train: torch.Tensor, test: torch.Tensor, repeats: int,
                   chunk: int = 4096) -> float:
    """Best seconds of the similarity matmuls alone, chunked like the FAISS search."""
    train = torch.nn.functional.normalize(train, dim=1)
    test = torch.nn.functional.normalize(test, dim=1)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for lo in range(0, len(test), chunk):
            test[lo:lo + chunk] @ train.T  # [chunk, N]
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=50_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each; best kept")
    ap.add_argument("--retrieval", action="store_true", help="also recall@K and mAP@R")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    feats = synthetic_features(args.train, args.test, args.dim)
    k = knn_speed(*feats, repeats=args.repeats, retrieval=args.retrieval)
    floor = matmul_seconds(feats[0], feats[2], args.repeats)
    flops = 2 * args.train * args.test * args.dim
    print(f"{args.train} x {args.test} x {args.dim}, ks {DEFAULT_KS}, retrieval "
          f"{args.retrieval}, torch threads {torch.get_num_threads()}")
    print(f"faiss ({k.backend}): {k.faiss_seconds:.2f} s (search {k.faiss_search_seconds:.2f} s)")
    print(f"torch brute force: {k.torch_seconds:.2f} s (search {k.torch_search_seconds:.2f} s)")
    print(f"speedup {k.speedup:.2f}x; predictions agree on {k.agreement:.3f} %")
    print(f"the similarity matmul alone: {floor:.2f} s ({flops / floor / 1e9:.0f} GFLOP/s); "
          f"faiss search = {k.faiss_search_seconds / floor:.2f}x it, "
          f"torch = {k.torch_search_seconds / floor:.2f}x it")
    if args.json:
        args.json.write_text(json.dumps({"args": {a: str(v) for a, v in vars(args).items()},
                                         "knn": vars(k), "speedup": k.speedup,
                                         "matmul_seconds": floor}, indent=2))


if __name__ == "__main__":
    main()
