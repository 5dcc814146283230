"""MoCo v2+ (``baselines/mocov2.py``) and the feature queue it shares with NNCLR
(``baselines/queue.py``), against lightly 1.6.0 on identical tensors: the InfoNCE with a memory
bank (``NTXentLoss(memory_bank_size=...)``), the queue's FIFO (``MemoryBankModule``), the
projection head (``MoCoProjectionHead``); the momentum schedule against solo-learn's
``MomentumUpdater`` formula; the recipe; the queue-longer-than-the-data error; two processes
against one; a pretraining on digits that resumes with its queues."""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from baselines.losses import queue_infonce
from baselines.mocov2 import MoCoV2, mocov2_views
from baselines.queue import FeatureQueue
from mae_bench.config import RunConfig
from mae_bench.errors import ConfigError
from mae_bench.methods.engine import pretrain
from mae_bench.methods.registry import Batch, build_method, resolve_config
from mae_bench.training.checkpoint import load_checkpoint
from mae_bench.training.distributed import sync_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 24, "queue_size": 64}


def _cfg(arch: str = "vit_micro_patch2", **ssl) -> RunConfig:
    return RunConfig().replace(model={"arch": arch}, train={"method": "mocov2"},
                               ssl={**SMALL, **ssl})


def _views(n: int = 8, seed: int = 0, size: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]


def _unit(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


# --- the loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.07, 0.2, 0.5])
def test_queue_infonce_equals_lightlys_ntxent_with_a_memory_bank(temperature):
    from lightly.loss import NTXentLoss

    q = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    k, queue = torch.randn(6, 5) * 3, _unit(2, 12, 5)
    theirs = NTXentLoss(temperature, memory_bank_size=(12, 5))
    theirs.memory_bank.bank.copy_(queue)
    ours = queue_infonce(q, k, queue, temperature)
    (grad,) = torch.autograd.grad(ours, q)
    ref = theirs(q, k)
    (ref_grad,) = torch.autograd.grad(ref, q)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_queue_infonce_closed_form_and_no_gradient_to_keys():
    """Orthogonal negatives, the key equal to the query: -log(e^{1/t} / (e^{1/t} + K))."""
    q = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    k = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    queue = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    loss = queue_infonce(q, k, queue, 0.2)
    assert loss.item() == pytest.approx(-math.log(math.exp(5) / (math.exp(5) + 2)), rel=1e-6)
    loss.backward()
    assert k.grad is None and q.grad is not None


# --- the queue ---------------------------------------------------------------------------------


def test_queue_is_fifo_as_lightlys_memory_bank_where_the_batch_divides_it():
    from lightly.models.modules.memory_bank import MemoryBankModule

    ours = FeatureQueue(12, 5, seed=3)
    theirs = MemoryBankModule((12, 5), feature_dim_first=False)
    theirs.bank.copy_(ours.features)
    for step in range(7):
        keys = _unit(10 + step, 4, 5)
        _, bank_before = theirs(keys, update=True)  # lightly: read the bank, then enqueue
        torch.testing.assert_close(ours.snapshot(), bank_before)
        ours.push(keys)
        torch.testing.assert_close(ours.features, theirs.bank)
        assert int(ours.ptr) == int(theirs.bank_ptr) == (step + 1) * 4 % 12


@pytest.mark.parametrize("size, batch", [(10, 4), (5, 7), (6, 6)])
def test_queue_holds_exactly_the_last_k_keys_whatever_the_batch(size, batch):
    """Where the batch does not divide K the write wraps around (the reference code asserts a
    multiple; lightly drops the keys past the end): row t mod K holds key t."""
    queue = FeatureQueue(size, 3, seed=0)
    start = queue.snapshot()
    ref: deque[torch.Tensor] = deque(start, maxlen=size)  # oldest first
    written = 0
    for step in range(5):
        keys = _unit(step, batch, 3) * (step + 2)  # stored normalised
        queue.push(keys)
        ref.extend(torch.nn.functional.normalize(keys, dim=1))
        written += min(batch, size)
        assert int(queue.ptr) == written % size
        # oldest first: rows from the pointer on, then the rows before it
        order = torch.roll(queue.features, -int(queue.ptr), dims=0)
        torch.testing.assert_close(order, torch.stack(list(ref)))


def test_queue_starts_as_seeded_unit_vectors_without_drawing_from_the_global_generator():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a, b, c = FeatureQueue(32, 8, seed=1), FeatureQueue(32, 8, seed=1), FeatureQueue(32, 8, 2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.features, b.features) and not torch.equal(a.features, c.features)
    torch.testing.assert_close(a.features.norm(dim=1), torch.ones(32))
    assert int(a.ptr) == 0 and set(a.state_dict()) == {"features", "ptr"}
    with pytest.raises(ValueError, match="size >= 1 and dim >= 1, got size=0, dim=8"):
        FeatureQueue(0, 8)


# --- the method --------------------------------------------------------------------------------


def test_projector_equals_lightlys_moco_v2_head():
    from lightly.models.modules import MoCoProjectionHead

    method = build_method(_cfg(), 3, 8)
    theirs = MoCoProjectionHead(method.feature_dim, 32, 16, num_layers=2, batch_norm=False)
    method.projector.load_state_dict(  # strict: same layers, shapes and biases
        {k.removeprefix("layers."): v for k, v in theirs.state_dict().items()})
    x = torch.randn(5, method.feature_dim)
    torch.testing.assert_close(method.projector(x), theirs(x))
    assert method.teacher_pairs == [("momentum_backbone", "backbone"),
                                    ("momentum_projector", "projector")]


def test_a_step_equals_lightlys_symmetric_moco_with_one_bank_per_view():
    """The loss, its gradients and both queues after the step equal two lightly NTXentLoss
    banks: view 1's queries against view 2's keys and bank, and the other way round."""
    from lightly.loss import NTXentLoss

    torch.manual_seed(0)
    method = build_method(_cfg(temperature=0.3), 3, 8).train()
    banks = [NTXentLoss(0.3, memory_bank_size=(64, 16)) for _ in range(2)]
    for bank, queue in zip(banks, method.queues, strict=True):
        bank.memory_bank.bank.copy_(queue.features)
    views = _views()
    loss = method(Batch(views, torch.zeros(8), torch.Generator()))["loss"]
    ours = torch.autograd.grad(loss, list(method.projector.parameters()))

    q1, q2 = (method.projector(h) for h in method.embed(views))
    with torch.no_grad():
        k1, k2 = (method.momentum_projector(g) for g in method.embed(views,
                                                                     method.momentum_backbone))
    # banks[v] holds view v + 1's keys: q1 meets k2 and view 2's bank
    ref = (banks[1](q1, k2) + banks[0](q2, k1)) / 2
    theirs = torch.autograd.grad(ref, list(method.projector.parameters()))
    torch.testing.assert_close(loss, ref)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    for bank, queue in zip(banks, method.queues, strict=True):
        torch.testing.assert_close(queue.features, bank.memory_bank.bank)
        assert int(queue.ptr) == 8


def test_eval_mode_and_a_no_grad_forward_in_eval_leave_the_queues_alone():
    method = build_method(_cfg(), 3, 8).eval()
    before = [q.snapshot() for q in method.queues]
    with torch.no_grad():
        method(Batch(_views(), torch.zeros(8), torch.Generator()))
    assert all(torch.equal(q.features, b) for q, b in zip(method.queues, before, strict=True))


@pytest.mark.parametrize("step", [1, 3, 10])
def test_momentum_follows_solo_learns_updater_from_099_to_0999(step):
    """solo-learn: after global step g the EMA uses tau set after step g - 1:
    0.999 - (0.999 - 0.99) (cos(pi (g - 1) / K) + 1) / 2."""
    torch.manual_seed(0)
    method = build_method(_cfg(), 3, 8)
    with torch.no_grad():
        for p in method.projector.parameters():
            p.add_(1.0)
    old = [p.clone() for p in method.momentum_projector.parameters()]
    method.on_step_end(step, 10)
    tau = 0.999 - (0.999 - 0.99) * (math.cos(math.pi * (step - 1) / 10) + 1) / 2
    for t_old, t, s in zip(old, method.momentum_projector.parameters(),
                           method.projector.parameters(), strict=True):
        torch.testing.assert_close(t, tau * t_old + (1 - tau) * s)


@pytest.mark.parametrize("arch, optimizer, blr, wd, scaling, ref_batch", [
    ("vit_micro_patch2", "adamw", 1.5e-4, 0.1, "sqrt", 4096),  # MoCo v3's ViT recipe
    ("resnet18", "sgd", 0.3, 1e-4, "linear", 256),  # solo-learn cifar/mocov2plus.yaml
])
def test_recipe(arch, optimizer, blr, wd, scaling, ref_batch):
    cfg = resolve_config(RunConfig().replace(model={"arch": arch}, train={"method": "mocov2"}))
    t, s = cfg.train, cfg.ssl
    assert (t.optimizer, t.blr, t.weight_decay, t.lr_scaling, t.lr_ref_batch) == (
        optimizer, blr, wd, scaling, ref_batch)
    assert (s.temperature, s.proj_hidden_dim, s.proj_dim, s.momentum, s.queue_size) == (
        0.2, 2048, 256, 0.99, 32768)


def test_views_are_moco_v2s_aug_plus():
    """main_moco.py's aug_plus: jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur p 0.5
    (off below 64 px), flip; no solarization; both views alike."""
    big, small = mocov2_views(64), mocov2_views(32)
    assert big[0] == big[1] and small[0] == small[1]
    v = big[0]
    assert (v.color_jitter, v.brightness, v.contrast, v.saturation, v.hue) == (
        0.8, 0.4, 0.4, 0.4, 0.1)
    assert (v.grayscale, v.blur, v.solarize, v.hflip, v.scale) == (0.2, 0.5, 0.0, 0.5,
                                                                    (0.08, 1.0))
    assert small[0].blur == 0.0
    assert build_method(_cfg(), 3, 32).view_specs() == small


def test_a_queue_longer_than_the_data_set_is_one_error_line():
    cfg = resolve_config(_cfg(queue_size=1438))
    with pytest.raises(ConfigError) as info:
        MoCoV2.check_data(cfg, 1437)
    assert str(info.value) == (
        "ssl.queue_size 1438 is longer than digits/train (1437 images): the queue of "
        "negatives would hold the same images' keys more than once; set --set "
        "ssl.queue_size=N with N <= 1437")
    MoCoV2.check_data(cfg, 1438)  # as long as the data set: accepted
    with pytest.raises(ConfigError, match=r"mocov2 needs a queue of negatives: ssl.queue_size "
                                          r"must be >= 1 \(default 32768\), got 0"):
        build_method(_cfg(queue_size=0), 3, 8)


# --- two processes, one data set ---------------------------------------------------------------

WORLD, PER_RANK = 2, 4


def _build_for_ddp(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = RunConfig().replace(model={"arch": "vit_micro_patch2"}, train={"method": name},
                              ssl={**SMALL, "queue_size": 16})
    return build_method(cfg, 3, 8).train()


def _ddp_worker(rank: int, name: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    try:
        method = sync_batchnorm(_build_for_ddp(name), torch.device("cpu"))
        ddp = torch.nn.parallel.DistributedDataParallel(method)
        views = [v[rank * PER_RANK:(rank + 1) * PER_RANK] for v in _views(WORLD * PER_RANK)]
        loss = ddp(Batch(views, torch.zeros(PER_RANK), torch.Generator()))["loss"]
        loss.backward()
        grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "grads": grads, "state": method.state_dict()},
                   Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["mocov2", "nnclr"])
def test_two_processes_match_one_on_the_combined_batch_queues_included(tmp_path, name):
    """Both users of the shared queue: the mean loss and every gradient equal one process's on
    the combined batch, and after the step each process holds that process's queues (the keys
    of both, gathered in rank order), though DDP no longer broadcasts them."""
    mp.spawn(_ddp_worker, args=(name, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    method = _build_for_ddp(name)
    loss = method(Batch(_views(WORLD * PER_RANK), torch.zeros(8), torch.Generator()))["loss"]
    loss.backward()
    mean = torch.stack([r["loss"] for r in ranks]).mean()
    assert mean.item() == pytest.approx(loss.item(), rel=1e-5)
    queues = {k: v for k, v in method.state_dict().items() if "queues." in k or "support." in k}
    assert set(method._ddp_params_and_buffers_to_ignore) == set(queues)
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    scale = torch.cat([g.flatten() for g in grads.values()]).norm()
    for r in ranks:
        assert r["grads"].keys() == grads.keys()
        for n, g in grads.items():  # float32 sums in another order: against the whole norm
            assert (r["grads"][n] - g).norm() <= 1e-5 * scale, n
        for k, v in queues.items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-5, atol=1e-6)


# --- the engine --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "vit_micro_patch2"])
def test_pretrains_on_digits_and_resumes_with_its_queues(tmp_path, arch):
    cfg = RunConfig().replace(model={"arch": arch},
                              train={"method": "mocov2", "epochs": 1, "batch_size": 32},
                              ssl={**SMALL, "queue_size": 256})
    full = pretrain(cfg, tmp_path / "full", max_steps=3, progress=False)
    pretrain(cfg, tmp_path / "part", max_steps=2, progress=False)
    part = pretrain(cfg, tmp_path / "part", max_steps=3, progress=False)  # resumes
    assert full.step == part.step == 3 and math.isfinite(full.final_loss)
    a, b = load_checkpoint(tmp_path / "full")["model"], load_checkpoint(tmp_path / "part")["model"]
    assert int(a["queues.0.ptr"]) == int(a["queues.1.ptr"]) == 3 * 32
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
