"""DistributedDataParallel on 2 CPU processes (gloo): the loss and the gradients equal one
process's on the combined batch (MAE; SimCLR with its all-gathered negatives and BatchNorm over
the global batch), and a torchrun pretraining writes one checkpoint and resumes from it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mae_bench.config import RunConfig
from mae_bench.methods.registry import Batch, build_method
from mae_bench.training.distributed import CPUSyncBatchNorm, sync_batchnorm

WORLD = 2
PER_RANK = 4
SIZE = 16


def _inputs(method_name: str) -> dict[str, torch.Tensor]:
    """The combined batch (both processes' halves), fixed by a seed."""
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(WORLD * PER_RANK, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    noise = torch.rand(WORLD * PER_RANK, (SIZE // 2) ** 2, generator=g)  # MAE masking
    return {"v1": views[0], "v2": views[1], "noise": noise}


def _build(method_name: str) -> torch.nn.Module:
    """``simclr@resnet18``: SimCLR on a ResNet (its 2-D BatchNorms synchronised too)."""
    torch.manual_seed(0)
    method_name, _, arch = method_name.partition("@")
    cfg = RunConfig().replace(model={"arch": arch or "vit_micro_patch2"},
                              train={"method": method_name})
    return build_method(cfg, 3, SIZE)


def _loss(method: torch.nn.Module, module: torch.nn.Module, method_name: str,
          x: dict[str, torch.Tensor]) -> torch.Tensor:
    if method_name == "mae":  # the model itself, so the masking noise can be given
        return module(x["v1"], 0.75, x["noise"])[0]
    batch = Batch([x["v1"], x["v2"]], torch.zeros(len(x["v1"]), dtype=torch.long),
                  torch.Generator())
    return module(batch)["loss"]


def _grads(method: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def _worker(rank: int, method_name: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    try:
        method = sync_batchnorm(_build(method_name), torch.device("cpu"))
        part = {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in
                _inputs(method_name).items()}
        inner = method.mae if method_name == "mae" else method
        ddp = torch.nn.parallel.DistributedDataParallel(inner)
        loss = _loss(method, ddp, method_name, part)
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": _grads(method)}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method_name", ["mae", "simclr", "simclr@resnet18"])
@pytest.mark.multiprocess
def test_two_processes_match_one_on_the_combined_batch(tmp_path, method_name):
    mp.spawn(_worker, args=(method_name, str(tmp_path / "store"), str(tmp_path)),
             nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]

    method = _build(method_name)
    inner = method.mae if method_name == "mae" else method
    loss = _loss(method, inner, method_name, _inputs(method_name))
    loss.backward()
    reference = _grads(method)

    # the global loss is the mean of the per-process losses (equal shares of the batch)
    mean = torch.stack([r["loss"] for r in ranks]).mean()
    assert mean.item() == pytest.approx(loss.item(), rel=1e-5)
    # a ResNet sums over 16 x 16 positions per channel: float32 sums in another order
    atol = 5e-5 if "resnet" in method_name else 1e-5
    for r in ranks:
        assert set(r["grads"]) == set(reference)
        for name, grad in reference.items():  # DDP averages: every rank holds the same
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=atol,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_sync_batchnorm_keeps_parameters_and_is_plain_outside_torchrun():
    method = _build("simclr")
    before = dict(method.named_parameters())
    assert sync_batchnorm(method, torch.device("cpu")) is method  # single process: unchanged
    assert not any(isinstance(m, CPUSyncBatchNorm) for m in method.modules())
    assert dict(method.named_parameters()).keys() == before.keys()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "mae_bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.multiprocess
def test_torchrun_pretrain_writes_one_checkpoint_and_resumes(tmp_path):
    run = tmp_path / "run"
    first = _torchrun("pretrain", "--arch", "vit_micro_patch2", "--batch-size", "8",
                      "--epochs", "1", "--max-steps", "2", "--log-every", "1", "--device",
                      "cpu", "--no-progress", "--out", str(run))
    assert first.returncode == 0, first.stderr[-3000:]
    files = sorted(p.name for p in run.iterdir())
    assert files.count("checkpoint.pt") == 1 and "checkpoint.prev.pt" not in files
    assert not [f for f in files if f.endswith(".tmp")]  # no partial save left
    info = json.loads((run / "run.json").read_text())
    assert info["effective_batch"] == 16  # 8 per process x 2 processes: lr follows it
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # rank 0 alone writes metrics

    second = _torchrun("pretrain", "--resume", str(run), "--max-steps", "4", "--no-progress")
    assert second.returncode == 0, second.stderr[-3000:]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # continued from step 2, nothing logged twice


def _rows(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
def test_torchrun_eval_gathers_features_to_rank_0_and_matches_one_process(tmp_path):
    """k-NN and the fast probe under torchrun: each rank extracts its part, rank 0 gathers
    them in order and alone writes; the numbers are one process's, the cache is written once
    and read back by the next command."""
    common = ["--checkpoint", "random", "--arch", "vit_micro_patch2", "--no-progress",
              "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "mae_bench", "eval", "--protocol", "knn",
                          *common, "--results-dir", str(tmp_path / "one"), "--no-cache"],
                         capture_output=True, text=True, timeout=300,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    cache = tmp_path / "cache"
    for protocol in ("knn", "linear"):
        two = _torchrun("eval", "--protocol", protocol, *common, "--cache-dir", str(cache),
                        "--results-dir", str(tmp_path / "two"))
        assert two.returncode == 0, two.stderr[-3000:]
        assert two.stdout.count("rows appended") == 1  # rank 0 reports, once
    rows = _rows(tmp_path / "two")
    knn = [r for r in rows if r["protocol"] == "knn"]
    reference = _rows(tmp_path / "one")
    assert len(knn) == len(reference) == 12  # 4 k x top-1/top-5, 4 retrieval metrics
    key = ("metric", "k")
    assert {tuple(r.get(k) for k in key): r["value"] for r in knn} == \
        {tuple(r.get(k) for k in key): r["value"] for r in reference}
    assert sorted(r["metric"] for r in rows if r["protocol"] == "linear") == ["top1", "top5"]
    # 2 splits x 2 poolings, written by rank 0 during the first command only
    assert len(list(cache.rglob("*.npz"))) == 4
    assert "features [1437 x 32]: cache" in two.stderr  # the second command read them


@pytest.mark.slow  # ~25 s: two 2-process sweeps; the pieces it joins are tested above
@pytest.mark.multiprocess
def test_torchrun_sweep_runs_each_point_once_on_every_rank(tmp_path):
    """A sweep under torchrun: every point trains with both processes (global batch 16),
    rank 0 writes each row and manifest line once, and a re-run skips the finished points."""
    args = ["sweep", "mask-ratio", "--values", "0.5,0.75", "--arch", "vit_micro_patch2",
            "--epochs", "0.1", "--batch-size", "8", "--protocols", "knn", "--no-progress",
            "--device", "cpu", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache")]
    first = _torchrun(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = _rows(tmp_path / "results")
    counts: dict[tuple, int] = {}
    for r in rows:  # the points' rows, then the random and pixels references' (no mask ratio)
        key = (r["method"], r.get("mask_ratio"), r["metric"], r.get("k"))
        counts[key] = counts.get(key, 0) + 1
    assert {k[:2] for k in counts} == {("mae", 0.5), ("mae", 0.75), ("random", None),
                                       ("pixels", None)}
    assert set(counts.values()) == {1}
    assert all(r["status"] == "ok" for r in rows)
    manifest = (tmp_path / "results" / "sweeps.jsonl").read_text().splitlines()
    assert len(manifest) == 2
    for run in (tmp_path / "runs").rglob("run.json"):
        assert json.loads(run.read_text())["effective_batch"] == 16
    again = _torchrun(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped") == 2  # rank 0 logs; both points were done
    assert len(_rows(tmp_path / "results")) == len(rows)
