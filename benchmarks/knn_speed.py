"""k-NN search speed: FAISS (``evals.knn.knn_evaluate``) against a plain torch brute force
(``evals.knn.knn_torch``) on the same synthetic features, alternating the two, and the share
of the time that is the similarity matmul itself (the floor any exact search pays).

    python benchmarks/knn_speed.py --train 50000 --test 10000 --dim 192 --repeats 2
    python benchmarks/knn_speed.py --retrieval   # also recall@K and mAP@R (search_k 1000)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evals.knn import DEFAULT_KS, knn_evaluate, knn_torch
from evals.speed_eval import synthetic_features


def matmul_seconds(train: torch.Tensor, test: torch.Tensor, chunk: int = 4096) -> float:
    """Seconds of the similarity matmuls alone, chunked like the FAISS search."""
    train = torch.nn.functional.normalize(train, dim=1)
    test = torch.nn.functional.normalize(test, dim=1)
    start = time.perf_counter()
    for lo in range(0, len(test), chunk):
        test[lo:lo + chunk] @ train.T  # [chunk, N]
    return time.perf_counter() - start


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
    faiss_s, torch_s, mm_s = [], [], []
    for _ in range(args.repeats):
        f = knn_evaluate(*feats, ks=DEFAULT_KS, retrieval=args.retrieval)
        t = knn_torch(*feats, ks=DEFAULT_KS, retrieval=args.retrieval)
        faiss_s.append((f.total_seconds, f.search_seconds))
        torch_s.append((t.total_seconds, t.search_seconds))
        mm_s.append(matmul_seconds(feats[0], feats[2]))
    agree = sum(int((f.predictions[k] == t.predictions[k]).sum()) for k in DEFAULT_KS)
    agree = 100.0 * agree / (args.test * len(DEFAULT_KS))
    best_f, best_t, best_mm = min(faiss_s), min(torch_s), min(mm_s)
    flops = 2 * args.train * args.test * args.dim
    print(f"{args.train} x {args.test} x {args.dim}, ks {DEFAULT_KS}, search_k {f.search_k}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"faiss ({f.backend}): {best_f[0]:.2f} s (search {best_f[1]:.2f} s)")
    print(f"torch brute force: {best_t[0]:.2f} s (search {best_t[1]:.2f} s)")
    print(f"speedup {best_t[0] / best_f[0]:.2f}x; predictions agree on {agree:.3f} %")
    print(f"the similarity matmul alone: {best_mm:.2f} s ({flops / best_mm / 1e9:.0f} GFLOP/s); "
          f"faiss search = {best_f[1] / best_mm:.2f}x it, torch = {best_t[1] / best_mm:.2f}x it")
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "faiss": best_f, "torch": best_t,
            "matmul": best_mm, "speedup": best_t[0] / best_f[0], "agreement": agree}, indent=2))


if __name__ == "__main__":
    main()
