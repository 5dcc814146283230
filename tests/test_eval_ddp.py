"""Fine-tuning and MAE's linear probe under torch.distributed (2 CPU processes, gloo): the final
weights and the returned accuracies equal one process's on the same global batches, each process
runs the model on half of every batch and on a share of the test set, only rank 0 reports
progress, and a batch the processes cannot split equally is a ConfigError."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from recipe_helpers import run_finetune as finetune
from recipe_helpers import run_probe as linear_probe

from evals.mae_probe import probe_head
from mae_bench.data import load_dataset
from mae_bench.errors import ConfigError
from mae_bench.models.vit import build_vit

WORLD = 2
BATCH = 32  # global: 16 images per process and step
TRAIN = 128  # images: 4 steps per epoch
EPOCHS = 2
STEPS = TRAIN // BATCH * EPOCHS
LR = 1e-3  # fine-tuning's peak lr
# Drop path 0: its masks are drawn per process, so a run with it is a different sample.
COMMON = {"epochs": EPOCHS, "batch_size": BATCH, "train_indices": torch.arange(TRAIN), "seed": 3}
FINETUNE = {**COMMON, "lr": LR, "crop_scale": (0.5, 1.0), "hflip": 0.0}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # Mixup / CutMix are drawn on the global batch, identically in every process.
    "finetune_mixup": ("finetune", {**FINETUNE, "mixup": 0.8, "cutmix": 1.0}),
    # blocks.0, the embeddings and the cls token frozen: DDP must skip them without complaint.
    "partial": ("finetune", {**FINETUNE, "mixup": 0.0, "cutmix": 0.0, "partial_blocks": 1}),
    "probe": ("probe", {**COMMON, "blr": 1.0, "pool": "mean"}),
}
BAD_BATCHES: dict[str, tuple[str, dict[str, Any]]] = {
    "finetune": ("finetune", {"epochs": 1, "batch_size": 9, "mixup": 0.0, "cutmix": 0.0}),
    "probe": ("probe", {"epochs": 1, "batch_size": 9}),
    "probe_capped": ("probe", {"epochs": 1, "batch_size": 32, "train_indices": torch.arange(9)}),
}
# Weights may differ from one process's by this much of their tensor's largest magnitude. The
# per-step gradient is the same sum over the global batch, only grouped differently (two
# halves, then DDP's average), so it differs by float32 rounding; 8 AdamW / LARS steps carry
# that to <= 7e-7 of the weights' scale here (measured). Errors are far larger: the probe's
# BatchNorm over each process's half instead of the global batch moves the head by 1.7e-4 of
# its scale and the running statistics by 1e-2 (measured).
RTOL_SCALE = 1e-5

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.multiprocess]


@functools.cache
def _digits() -> tuple[Any, Any]:
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _model(protocol: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if protocol == "finetune":
        return build_vit("vit_micro_patch2", 8, 1, num_classes=10, global_pool="avg",
                         drop_path_rate=0.0)
    return build_vit("vit_micro_patch2", 8, 1)


def _state(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in module.state_dict().items()}


def _run(protocol: str, kwargs: dict[str, Any], seed: int) -> dict[str, Any]:
    """One call. Records the weights before and after (the probe's head included), the result,
    the number of images of each model call, and the progress calls."""
    model = _model(protocol, seed)
    sizes: list[int] = []
    model.patch_embed.register_forward_pre_hook(lambda _m, args: sizes.append(len(args[0])))
    calls: list[tuple[int, int]] = []
    heads: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []

    def recording_head(*args: Any, **kw: Any) -> torch.nn.Module:
        head = probe_head(*args, **kw)
        heads.append((head, _state(head, "head.")))
        return head

    prefix = "" if protocol == "finetune" else "encoder."
    initial = _state(model, prefix)
    fn = finetune if protocol == "finetune" else linear_probe
    with mock.patch("evals.mae_probe.probe_head", recording_head):
        result = fn(model, *_digits(), progress=lambda *a: calls.append(a), **kwargs)
    final = _state(model, prefix)
    for head, head_initial in heads:
        initial |= head_initial
        final |= _state(head, "head.")
    return {"initial": initial, "state": final, "result": result, "sizes": sizes,
            "progress": calls}


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    try:
        errors = {}
        for name, (protocol, kwargs) in BAD_BATCHES.items():
            try:
                _run(protocol, kwargs, seed=0)
            except ConfigError as e:
                errors[name] = str(e)
        # Each rank starts from different weights: rank 0's are the ones trained (DDP, and the
        # probe's broadcast of the frozen encoder), as in the reference run (seed 0).
        runs = {name: _run(protocol, kwargs, seed=rank)
                for name, (protocol, kwargs) in CASES.items()}
        torch.save({"errors": errors, "runs": runs}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> list[dict[str, Any]]:
    """Every case on 2 processes, started once. Forked rather than spawned: a spawned process
    imports torch and timm again, 10-30 s on a busy 2-core machine; a fork starts in well under
    one. The children set one thread before any torch op, so no OpenMP pool crosses the fork."""
    tmp = tmp_path_factory.mktemp("ddp")
    _digits()  # loaded once, inherited by the children
    mp.start_processes(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True,
                       start_method="fork")
    return [torch.load(tmp / f"{r}.pt") for r in range(WORLD)]


def _key_bias(key: str, tensor: torch.Tensor) -> slice | None:
    """The key bias inside a qkv bias [3D]. Its gradient is exactly zero (adding a vector to
    every key shifts each softmax row by a constant), so what it gets is float rounding noise,
    which AdamW divides by its own magnitude: steps of up to ~lr in either run, at random."""
    if key.endswith("attn.qkv.bias"):
        d = len(tensor) // 3
        return slice(d, 2 * d)
    return None


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_train_what_one_does(ddp, name):
    protocol, kwargs = CASES[name]
    reference = _run(protocol, kwargs, seed=0)
    ref_state, ref_result = reference["state"], reference["result"]
    moved = max(float((ref_state[k] - v).abs().max() / v.abs().max().clamp_min(1e-3))
                for k, v in reference["initial"].items() if v.is_floating_point())
    assert moved > 100 * RTOL_SCALE  # training changed the weights well beyond the tolerance
    for rank, run in enumerate(ddp):
        got = run["runs"][name]
        # Accuracies are summed hit counts over disjoint test shards: exactly one process's.
        assert got["result"]["top1"] == ref_result["top1"]
        assert got["result"]["top5"] == ref_result["top5"]
        assert got["result"]["train_loss"] == pytest.approx(ref_result["train_loss"], rel=1e-5)
        assert got["state"].keys() == ref_state.keys()
        for key, ref in ref_state.items():
            value = got["state"][key]
            if not ref.is_floating_point():  # BatchNorm's step count
                assert torch.equal(value, ref), key
                continue
            if (noise := _key_bias(key, ref)) is not None:
                assert float((value[noise] - ref[noise]).abs().max()) <= 2 * LR * STEPS, key
                value, ref = value.clone(), ref.clone()
                value[noise] = ref[noise] = 0
            scale = max(float(ref.abs().max()), 1e-3)
            torch.testing.assert_close(value, ref, rtol=0, atol=RTOL_SCALE * scale,
                                       msg=lambda m, k=key, r=rank: f"rank {r} {name} {k}: {m}")
        # The model ran on this process's half of each step's batch, then on every other
        # test batch (both processes' together: the test set once).
        assert got["sizes"][:STEPS] == [BATCH // WORLD] * STEPS
        assert got["progress"] == (reference["progress"] if rank == 0 else [])
    assert reference["sizes"][:STEPS] == [BATCH] * STEPS
    assert reference["progress"] == [(s, STEPS) for s in range(1, STEPS + 1)]
    assert sum(sum(run["runs"][name]["sizes"][STEPS:]) for run in ddp) == len(_digits()[1])


def test_partial_finetuning_keeps_rank_0s_frozen_weights(ddp):
    start = _model("finetune", seed=0).state_dict()
    for run in ddp:
        state = run["runs"]["partial"]["state"]
        for key in ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight"):
            assert torch.equal(state[key], start[key]), key  # frozen; broadcast from rank 0
        assert not torch.equal(state["blocks.1.attn.qkv.weight"],
                               start["blocks.1.attn.qkv.weight"])


def test_batch_not_divisible_by_world_size_is_a_config_error(ddp):
    split = ("cannot be split equally between 2 processes (it is the global batch of a step); "
             "use a multiple of 2")
    for run in ddp:
        assert run["errors"] == {
            "finetune": f"batch_size 9 {split}",
            "probe": f"batch_size 9 {split}",
            "probe_capped": f"the batch of 9 (batch_size 32 capped at the training set) {split}",
        }
