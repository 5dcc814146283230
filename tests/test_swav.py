"""SwAV (baselines/swav.py) against reference implementations on identical tensors: Sinkhorn
against a line-by-line transcription of main_swav.py's ``distributed_sinkhorn`` and lightly's
``sinkhorn``; the loss, heads and defaults against lightly 1.6.0 (``SwaVLoss``,
``SwaVProjectionHead``, ``SwaVPrototypes``); the per-step updates (prototype normalisation and
freezing, the queue's FIFO and start epoch); the bad-batch error; pretraining on digits that
resumes exactly; two processes against one on the combined batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from cli_helpers import run_cli
from lightly.loss import SwaVLoss
from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

from baselines.swav import SwAV, sinkhorn, swav_loss
from baselines.views import swav_views
from mae_bench.config import RunConfig
from mae_bench.methods.engine import pretrain
from mae_bench.methods.registry import METHODS, Batch, build_method, resolve_config
from mae_bench.training.checkpoint import load_checkpoint
from mae_bench.training.distributed import sync_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

IMG = 8
HEADS = {"proj_hidden_dim": 32, "proj_dim": 16, "num_prototypes": 12}


def _cfg(batch: int = 6, **ssl) -> RunConfig:
    return RunConfig().replace(model={"arch": "vit_micro_patch2", "img_size": IMG},
                               train={"method": "swav", "epochs": 2, "batch_size": batch},
                               ssl={**HEADS, **ssl})


def _views(method: SwAV, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, s.img_size, s.img_size, generator=g) for s in method.view_specs()]


def _batch(method: SwAV, n: int = 6, seed: int = 0, step: int = 0) -> Batch:
    return Batch(_views(method, n, seed), torch.full((n,), -1), torch.Generator(), step, 10)


def _scores(seed: int, b: int, k: int, d: int = 16) -> torch.Tensor:
    """[B, K] cosines of random unit features and unit prototypes, as SwAV scores them."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.T


def official_sinkhorn(out: torch.Tensor, iterations: int, epsilon: float) -> torch.Tensor:
    """main_swav.py's ``distributed_sinkhorn`` transcribed line by line for one process (its
    ``dist.all_reduce`` calls are then the identity)."""
    Q = torch.exp(out / epsilon).t()  # K x B, the paper's notation
    B = Q.shape[1] * 1  # world size 1
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for _ in range(iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


# --- Sinkhorn --------------------------------------------------------------------------------


@pytest.mark.parametrize("b, k", [(8, 5), (6, 30), (32, 32)])
@pytest.mark.parametrize("iterations, epsilon", [(1, 0.05), (3, 0.05), (3, 0.03), (10, 0.1)])
def test_sinkhorn_equals_the_official_algorithm_and_lightly(b, k, iterations, epsilon):
    scores = _scores(b * k, b, k)
    codes = sinkhorn(scores, iterations, epsilon)
    assert codes.shape == (b, k) and codes.dtype == torch.float32
    expected = official_sinkhorn(scores.double(), iterations, epsilon)
    torch.testing.assert_close(codes.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(codes, lightly_sinkhorn(scores, iterations, epsilon),
                               rtol=1e-5, atol=1e-7)


def test_sinkhorn_codes_sum_to_one_per_sample_and_spread_evenly_over_prototypes():
    scores = _scores(0, 24, 6)
    codes = sinkhorn(scores, iterations=200, epsilon=0.05)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(24))
    torch.testing.assert_close(codes.sum(dim=0), torch.full((6,), 24 / 6), rtol=1e-4, atol=0)
    # equivariant under a permutation of the samples; a constant added to every score is
    # removed by the first normalisation
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sinkhorn(scores[perm], 200, 0.05), codes[perm])
    torch.testing.assert_close(sinkhorn(scores + 0.3, 200, 0.05), codes)


def test_one_sample_gets_the_uniform_code_whatever_its_scores():
    """Why a batch of one is refused: its code carries nothing."""
    codes = sinkhorn(torch.tensor([[0.9, -0.5, 0.1, 0.0]]), 3, 0.05)
    torch.testing.assert_close(codes, torch.full((1, 4), 0.25))


def test_sinkhorn_stays_finite_where_the_unshifted_exponential_overflows():
    scores = _scores(3, 16, 8) * 0.5 + 0.45
    scores[0, 0] = 0.95  # exp(0.95 / 0.01) = 1.8e41, beyond float32's 3.4e38
    assert not torch.isfinite(official_sinkhorn(scores.clone(), 3, 0.01)).all()
    codes = sinkhorn(scores, 3, 0.01)
    torch.testing.assert_close(codes.double(), official_sinkhorn(scores.double(), 3, 0.01),
                               rtol=1e-4, atol=1e-6)


# --- the loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("local_crops", [0, 2])
@pytest.mark.parametrize("temperature, iterations, epsilon", [(0.1, 3, 0.05), (0.2, 1, 0.03),
                                                              (0.5, 5, 0.1)])
def test_loss_and_its_gradient_equal_lightlys_swav_loss(local_crops, temperature, iterations,
                                                        epsilon):
    scores = [_scores(i, 8, 10).requires_grad_() for i in range(2 + local_crops)]
    codes = [sinkhorn(s, iterations, epsilon) for s in scores[:2]]
    ours = swav_loss(scores, codes, temperature)
    ours.backward()
    ours_grads = [s.grad.clone() for s in scores]
    for s in scores:
        s.grad = None
    ref = SwaVLoss(temperature, iterations, epsilon)(scores[:2], scores[2:])
    ref.backward()
    torch.testing.assert_close(ours, ref.squeeze(), rtol=1e-6, atol=1e-6)
    for a, s in zip(ours_grads, scores, strict=True):
        torch.testing.assert_close(a, s.grad, rtol=1e-5, atol=1e-7)


def _lightly_copy(method: SwAV) -> tuple[SwaVProjectionHead, SwaVPrototypes]:
    """lightly's heads holding the method's weights (lightly's prototypes have a bias: 0)."""
    proj_dim, k = method.prototypes.in_features, method.prototypes.out_features
    head = SwaVProjectionHead(method.feature_dim, method.projector[0].out_features, proj_dim)
    head.layers.load_state_dict(method.projector.state_dict())
    prototypes = SwaVPrototypes(proj_dim, k)
    prototypes.heads[0].weight.data.copy_(method.prototypes.weight)
    prototypes.heads[0].bias.data.zero_()
    return head.train(), prototypes


@pytest.mark.parametrize("local_crops, temperature", [(0, 0.1), (2, 0.25)])
def test_method_equals_lightlys_heads_and_loss_on_identical_weights(local_crops, temperature):
    torch.manual_seed(0)
    method = build_method(_cfg(local_crops=local_crops, temperature=temperature), 3, IMG)
    method.train()
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)  # normalised by the forward, as by lightly's
    head, prototypes = _lightly_copy(method)
    batch = _batch(method)
    assert [v.shape[-1] for v in batch.views] == [IMG, IMG] + [4] * local_crops
    loss = method(batch)["loss"]
    prototypes.normalize()  # lightly's training loop: before the forward
    torch.testing.assert_close(method.prototypes.weight, prototypes.heads[0].weight)
    out = [prototypes(F.normalize(head(h), dim=1)) for h in method.embed(batch.views)]
    ref = SwaVLoss(temperature, 3, 0.05)(out[:2], out[2:])
    torch.testing.assert_close(loss, ref.squeeze(), rtol=1e-5, atol=1e-6)


def test_defaults_equal_the_paper_lightly_and_solo_learn():
    vit = resolve_config(RunConfig().replace(train={"method": "swav"}))
    s = vit.ssl
    head, prototypes, loss = SwaVProjectionHead(), SwaVPrototypes(), SwaVLoss()
    assert (s.proj_hidden_dim, s.proj_dim) == (head.layers[0].out_features,
                                               head.layers[3].out_features) == (2048, 128)
    assert s.num_prototypes == prototypes.heads[0].out_features == 3000
    assert (s.temperature, s.sinkhorn_iterations, s.sinkhorn_epsilon) == (
        loss.temperature, loss.sinkhorn_iterations, loss.sinkhorn_epsilon) == (0.1, 3, 0.05)
    assert (s.queue_size, s.queue_start_epochs, s.freeze_last_layer_epochs, s.local_crops) == (
        3840, 15.0, 1.0, 0)
    t = vit.train
    assert (t.optimizer, t.blr, t.weight_decay, t.lr_scaling, t.lr_ref_batch) == (
        "adamw", 1.5e-4, 0.1, "sqrt", 4096)
    # solo-learn scripts/pretrain/cifar/swav.yaml
    cnn = resolve_config(RunConfig().replace(model={"arch": "resnet18"},
                                             train={"method": "swav"}))
    t, s = cnn.train, cnn.ssl
    assert (t.optimizer, t.blr, t.weight_decay, t.lr_scaling, t.lr_ref_batch, t.lars_eta,
            t.lars_clip_lr) == ("lars", 0.6, 1e-6, "linear", 256, 0.02, True)
    assert (s.proj_hidden_dim, s.proj_dim, s.num_prototypes, s.temperature, s.queue_size,
            s.queue_start_epochs, s.freeze_last_layer_epochs, s.sinkhorn_epsilon,
            s.sinkhorn_iterations) == (2048, 128, 3000, 0.1, 3840, 50.0, 2.0, 0.05, 3)
    assert METHODS["swav"] is SwAV


def test_views_are_the_papers_multicrop():
    views = swav_views(96, 6, 48)
    assert [v.img_size for v in views] == [96] * 2 + [48] * 6
    assert [v.scale for v in views] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    assert all((v.color_jitter, v.brightness, v.contrast, v.saturation, v.hue, v.grayscale,
                v.blur, v.interpolation) == (0.8, 0.8, 0.8, 0.8, 0.2, 0.2, 0.5, "bilinear")
               for v in views)
    assert len(swav_views(32, 0, 16)) == 2


# --- per-step updates ------------------------------------------------------------------------


def test_prototypes_are_normalised_before_the_forward_and_frozen_then_learning():
    method = build_method(_cfg(freeze_last_layer_epochs=1.0), 3, IMG).train()
    with torch.no_grad():
        method.prototypes.weight.mul_(5.0)
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    learnt = []
    for step in (4, 5):  # epochs 0.8 (frozen) and 1.0 (learning) of 2
        method(_batch(method, step=step))["loss"].backward()
        w = method.prototypes.weight
        torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]))
        assert w.grad is not None and w.grad.abs().sum() > 0
        before = w.detach().clone()
        method.before_optimizer_step(step, 10)
        assert (w.grad is None) == (step == 4)
        assert method.projector[0].weight.grad is not None  # only the prototypes freeze
        opt.step()
        opt.zero_grad(set_to_none=True)
        learnt.append(not torch.equal(w, before))
    assert learnt == [False, True]


def test_queue_is_fifo_starts_at_its_epoch_and_is_used_once_full():
    torch.manual_seed(0)
    # batch 4, queue 10 -> 8 rows (whole batches); filled from epoch 1 of 2 (step 5 of 10)
    method = build_method(_cfg(batch=4, queue_size=10, queue_start_epochs=1.0), 3, IMG).train()
    assert method.queue.shape == (2, 8, HEADS["proj_dim"])
    pushed = []
    for step in range(8):
        batch = _batch(method, n=4, seed=step, step=step)
        method.normalize_prototypes()
        queue = method.queue.clone()
        with torch.no_grad():
            loss = method(batch)["loss"]
            z = [F.normalize(method.projector(h), dim=1) for h in method.embed(batch.views)]
            scores = [method.prototypes(zi) for zi in z]
        used = step >= 7  # filled at steps 5 and 6: full from step 7 on
        queue_out = [queue[i] @ method.prototypes.weight.T for i in range(2)] if used else None
        ref = SwaVLoss(0.1, 3, 0.05)(scores, [], queue_out)
        torch.testing.assert_close(loss, ref.squeeze(), rtol=1e-5, atol=1e-6)
        if step < 5:
            assert not method.queue.any()
        else:
            pushed.append(torch.stack(z))  # [2, 4, P]
            newest_first = torch.cat(pushed[::-1][:2], dim=1)  # [2, 8 or 4, P]
            torch.testing.assert_close(method.queue[:, :newest_first.shape[1]], newest_first)
    # the queue is a buffer: saved and loaded with the weights
    assert torch.equal(method.state_dict()["queue"], method.queue)


def test_a_queue_saved_by_another_number_of_processes_starts_empty():
    method = build_method(_cfg(batch=4, queue_size=16), 3, IMG)
    state = method.state_dict()
    state["queue"] = torch.ones(2, 12, HEADS["proj_dim"])  # rounded for 3 processes
    fresh = build_method(_cfg(batch=4, queue_size=16), 3, IMG)
    fresh.load_state_dict(state)
    assert fresh.queue.shape == (2, 16, HEADS["proj_dim"]) and not fresh.queue.any()
    assert torch.equal(fresh.prototypes.weight, method.prototypes.weight)


# --- the user's side: bad input, pretraining and resume --------------------------------------


def test_a_batch_of_one_is_one_config_error_line(monkeypatch, capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--method", "swav", "--arch",
                           "vit_micro_patch2", "--img-size", "8", "--batch-size", "1",
                           "--no-progress", "--out", str(out_dir))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0] == (
        "error: swav: --batch-size 1 cannot fill SwAV's Sinkhorn step, which needs at least 2 "
        "images per process (one image's code is always the uniform 1/K, whatever its scores, "
        "and the projector's BatchNorm needs two); use --batch-size 2 or more")
    assert not out_dir.exists()
    assert build_method(_cfg(batch=2), 3, IMG).batch_size == 2  # the smallest it takes


@pytest.mark.parametrize("arch", [
    "vit_micro_patch2",
    pytest.param("resnet18", marks=pytest.mark.slow),  # ~75 s on one CPU thread
])
def test_one_epoch_on_digits_runs_and_resumes_exactly(monkeypatch, capsys, tmp_path, arch):
    """44 steps of 32 digits; the queue (2 batches) fills from step 11 and is used from step
    13, the prototypes learn from step 22: a stop at step 17 and a resume through the CLI
    replay the uninterrupted run bit for bit."""
    cfg = RunConfig().replace(
        model={"arch": arch, "img_size": 8},
        train={"method": "swav", "epochs": 1, "batch_size": 32, "log_every": 1,
               "deterministic": True},
        ssl={"num_prototypes": 32, "proj_hidden_dim": 64, "proj_dim": 32, "queue_size": 64,
             "queue_start_epochs": 0.25, "freeze_last_layer_epochs": 0.5})
    full = pretrain(cfg, tmp_path / "full", progress=False)
    assert full.finished and full.step == 44 and math.isfinite(full.final_loss)
    assert pretrain(cfg, tmp_path / "part", max_steps=17, progress=False).step == 17
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--resume", str(tmp_path / "part"),
                           "--no-progress")
    assert code == 0, err
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a["step"] == b["step"] == 44 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["model"]["queue"].shape == (2, 64, 32) and a["model"]["queue"][:, -1].any()
    saved = RunConfig.from_yaml(tmp_path / "full" / "config.yaml")
    assert saved.train.optimizer == ("lars" if arch == "resnet18" else "adamw")
    assert saved.ssl.num_prototypes == 32 and saved.ssl.sinkhorn_epsilon == 0.05


# --- torchrun: two processes equal one on the combined batch ---------------------------------


WORLD, PER_RANK = 2, 4


def _ddp_method(batch: int) -> SwAV:
    torch.manual_seed(0)
    method = build_method(_cfg(batch=batch, queue_size=16, queue_start_epochs=0.0), 3, IMG)
    g = torch.Generator().manual_seed(7)  # a full queue, the same on every process
    method.queue.copy_(F.normalize(torch.randn(method.queue.shape, generator=g), dim=2))
    return method.train()


def _ddp_inputs(method: SwAV) -> tuple[Batch, torch.Tensor]:
    views = _views(method, WORLD * PER_RANK, seed=3)
    return Batch(views, torch.zeros(WORLD * PER_RANK), torch.Generator()), _scores(9, 8, 12)


def _ddp_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    try:
        method = sync_batchnorm(_ddp_method(PER_RANK), torch.device("cpu"))
        batch, scores = _ddp_inputs(method)
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        codes = sinkhorn(scores[mine], 3, 0.05)
        batch.views = [v[mine] for v in batch.views]
        ddp = torch.nn.parallel.DistributedDataParallel(method)  # held: its hooks reduce
        loss = ddp(batch)["loss"]
        loss.backward()
        grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "grads": grads, "codes": codes,
                    "queue": method.queue}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_processes_match_one_on_the_combined_batch_with_the_queue(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    method = _ddp_method(WORLD * PER_RANK)
    batch, scores = _ddp_inputs(method)
    # Sinkhorn over the global batch: each process's rows of the one-process codes
    torch.testing.assert_close(torch.cat([r["codes"] for r in ranks]),
                               sinkhorn(scores, 3, 0.05), rtol=1e-5, atol=1e-7)
    loss = method(batch)["loss"]
    loss.backward()
    mean = torch.stack([r["loss"] for r in ranks]).mean()
    assert mean.item() == pytest.approx(loss.item(), rel=1e-5)
    reference = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    for r in ranks:
        torch.testing.assert_close(r["queue"], method.queue)  # the same on every process
        assert set(r["grads"]) == set(reference)
        for name, grad in reference.items():  # DDP averages: every rank holds the same
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")
