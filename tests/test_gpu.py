"""GPU correctness: what runs on CUDA computes what the CPU computes.

Skipped on machines without CUDA (CI); `benchmarks/gpu_check.sh` runs them on a GPU machine
together with the GPU throughput numbers. Each test fixes one source of divergence:

- every method's loss and gradients on CUDA in fp32 against the same weights and views on the
  CPU (TF32 off, so the comparison is of fp32 arithmetic);
- the same under bf16 autocast: finite, and no further from fp32 than the CPU's bf16;
- the fused attention kernels (flash / memory-efficient SDPA) against the explicit path;
- a pretraining run stopped and resumed on the GPU, against an uninterrupted one (bit-exact
  under --deterministic), and its checkpoint evaluated on the CPU and on the GPU.

Not here: NCCL between processes. One GPU cannot hold two NCCL ranks, and with one process
torchrun's job never creates a process group (``distributed.join_process_group``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae_bench.config import RunConfig
from mae_bench.data.augment import BatchViews
from mae_bench.methods.registry import METHODS, Batch, build_method
from mae_bench.models.attention import set_attention
from mae_bench.results import read_results

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

IMG = 32
SMALL_HEADS = {"proj_hidden_dim": 64, "proj_dim": 32, "out_dim": 64}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 on the GPU is compared with fp32 on the CPU, so TF32 stays off in these tests."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cfg(name: str) -> RunConfig:
    return RunConfig().replace(model={"arch": "vit_mini_patch4", "img_size": IMG},
                               train={"method": name, "epochs": 2}, ssl=SMALL_HEADS)


def _pair(name: str):
    """The same method (same weights) on the CPU and on the GPU, and one batch's inputs."""
    torch.manual_seed(0)
    cpu = build_method(_cfg(name), 3, IMG).train()
    gpu = copy.deepcopy(cpu).cuda()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 36, 36), dtype=torch.uint8, generator=g)
    views = [BatchViews(s, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(images, g)
             for s in cpu.view_specs()]
    return cpu, gpu, views


def _run(method, views, device: str, autocast_dtype=None):
    """Loss and gradients of one step; the masking noise comes from a CPU generator (seed 7)
    on both devices, so MAE masks the same patches."""
    method.zero_grad(set_to_none=True)
    batch = Batch([v.to(device) for v in views], torch.full((16,), -1, device=device),
                  torch.Generator().manual_seed(7), 3, 10)
    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = method(batch)["loss"]
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in method.named_parameters()
             if p.grad is not None}
    return loss.detach().float().cpu(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fp32_loss_and_gradients_match_the_cpu(name):
    cpu, gpu, views = _pair(name)
    loss_c, grads_c = _run(cpu, views, "cpu")
    loss_g, grads_g = _run(gpu, views, "cuda")
    assert grads_c.keys() == grads_g.keys()
    assert torch.allclose(loss_g, loss_c, rtol=1e-5, atol=1e-6), (loss_g, loss_c)
    worst = max(grads_c, key=lambda n: _relative(grads_g[n], grads_c[n]))
    assert _relative(grads_g[worst], grads_c[worst]) < 1e-3, worst


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_autocast_is_no_further_from_fp32_than_the_cpus_bf16(name):
    """bf16 moves the loss and gradients away from fp32 by an amount that depends on the
    method (at initialisation: 0.5 % of the gradient's norm for MAE, over 20 % for BYOL and
    MoCo v3, whose predictors' BatchNorm on 16 images amplifies rounding). The reference is
    the CPU's own bf16 autocast of the same step: the GPU's must be as close to fp32."""
    cpu, gpu, views = _pair(name)
    cpu_bf16 = copy.deepcopy(cpu)
    loss_c, grads_c = _run(cpu, views, "cpu")
    loss_b, grads_b = _run(gpu, views, "cuda", torch.bfloat16)
    loss_r, grads_r = _run(cpu_bf16, views, "cpu", torch.bfloat16)
    assert torch.isfinite(loss_b) and all(torch.isfinite(g).all() for g in grads_b.values())
    assert abs(float(loss_b - loss_c)) <= 2 * abs(float(loss_r - loss_c)) + 5e-3 * abs(
        float(loss_c)), (loss_b, loss_r, loss_c)
    flat_c = torch.cat([g.flatten() for g in grads_c.values()])
    flat_b = torch.cat([grads_b[n].flatten() for n in grads_c])
    flat_r = torch.cat([grads_r[n].flatten() for n in grads_c])
    assert _relative(flat_b, flat_c) <= 2 * _relative(flat_r, flat_c) + 0.02
    assert torch.nn.functional.cosine_similarity(flat_b, flat_c, dim=0) > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_attention_kernels_match_the_explicit_path(dtype):
    _, gpu, views = _pair("mae")
    encoder = gpu.encoder.eval()
    x = views[0].cuda()
    outs = {}
    for path in ("math", "fused"):
        set_attention(encoder, path)
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype,
                                             enabled=dtype != torch.float32):
            outs[path] = encoder.forward_features(x).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert _relative(outs["fused"], outs["math"]) < tol


def _cli(*args: str, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "mae_bench", *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


PRETRAIN = ("pretrain", "--dataset", "digits", "--arch", "vit_mini_patch2", "--epochs", "2",
            "--batch-size", "64", "--device", "cuda", "--no-progress", "--log-every", "1")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_stopped_and_resumed_run_on_the_gpu_equals_an_uninterrupted_one(tmp_path, method):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    det = ("--method", method, "--deterministic", "--precision", "bf16")
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    _cli(*PRETRAIN, *det, "--max-steps", "12", "--out", str(whole), env=env)
    _cli(*PRETRAIN, *det, "--max-steps", "5", "--out", str(parts), env=env)
    _cli(*PRETRAIN, *det, "--max-steps", "12", "--resume", str(parts), env=env)
    la, lb = _losses(whole), _losses(parts)
    a, b = _weights(whole), _weights(parts)
    diff = {k: float((a[k].float() - b[k].float()).abs().max())
            for k in a if a[k].is_floating_point()}
    worst = sorted(diff.items(), key=lambda kv: -kv[1])[:3]
    assert la == lb and max(diff.values()) == 0.0, (
        f"losses differ by up to {max(abs(x - y) for x, y in zip(la, lb, strict=True)):.3g}; "
        f"largest weight differences {worst}")


def test_a_gpu_checkpoint_evaluates_the_same_on_the_cpu_and_the_gpu(tmp_path):
    run = tmp_path / "run"
    _cli(*PRETRAIN, "--method", "mae", "--max-steps", "20", "--out", str(run))
    accs = {}
    for device in ("cpu", "cuda"):
        store = tmp_path / f"results-{device}"
        _cli("eval", "--protocol", "knn", "--checkpoint", str(run), "--dataset", "digits",
             "--device", device, "--precision", "fp32", "--results-dir", str(store))
        rows = read_results(store)
        accs[device] = rows[rows["metric"] == "top1"].sort_values("k")["value"].tolist()
    assert accs["cpu"] and len(accs["cpu"]) == len(accs["cuda"])
    # fp32 features from two devices: the same neighbours up to a tie or two in 360 test images
    assert all(abs(c - g) <= 0.6 for c, g in zip(accs["cpu"], accs["cuda"], strict=True)), accs


def test_crops_resized_and_jpegs_decoded_on_the_gpu_match_the_cpu():
    """The streamed path's device half on CUDA: crops resized there are within a level of the
    CPU's (float kernel against the CPU's uint8 one), and nvJPEG's batched decode of the files
    gives the CPU decoder's crops within a few levels (the IDCTs differ)."""
    import io

    import numpy as np
    from PIL import Image

    from mae_bench.data.augment import ViewSpec
    from mae_bench.data.pipeline import DecodeCrop, ReadBoxes, collate_crops, collate_encoded

    rng = np.random.default_rng(0)
    spec = ViewSpec(24)
    files = []
    for i in range(6):
        y, x = np.mgrid[0:60 + 5 * i, 0:80] / 80
        pixels = np.stack([127 + 100 * np.sin(6 * (x + c * y) + i) for c in range(3)], -1)
        pixels += rng.normal(0, 3, pixels.shape)
        buf = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
        files.append(buf.getvalue())
    for transform, collate, tol in ((DecodeCrop([spec]), collate_crops, 1),
                                    (ReadBoxes([spec]), collate_encoded, 4)):
        transform.epoch_seed = 5
        (view,), _ = collate([(transform(f, str(i), i), i) for i, f in enumerate(files)])
        cpu = view.to("cpu").resize(24)
        (view,), _ = collate([(transform(f, str(i), i), i) for i, f in enumerate(files)])
        gpu = view.to("cuda").resize(24)
        assert gpu.device.type == "cuda" and gpu.shape == cpu.shape == (6, 3, 24, 24)
        diff = (gpu.cpu().int() - cpu.int()).abs()
        assert int(diff.max()) <= 3 * tol and float(diff.float().mean()) <= tol / 2, transform


@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None,
                    reason="NVIDIA DALI is not installed (pip install 'mae-bench[dali]')")
def test_dali_on_the_gpu_gives_its_cpu_views_within_a_few_levels():
    """The dali pipeline with ``device="mixed"`` (nvJPEG) against its CPU-only pipeline
    (libjpeg-turbo): the same boxes, IDCTs and resize arithmetic that differ slightly."""
    import io

    import numpy as np

    from mae_bench.data import sample_photos
    from mae_bench.data.augment import ViewSpec
    from mae_bench.data.pipeline import ReadBoxes, collate_encoded

    photos, rng = sample_photos._photos(), np.random.default_rng(0)
    files = []
    for _ in range(8):
        buf = io.BytesIO()
        sample_photos._draw_image(photos, rng).save(buf, format="JPEG", quality=90)
        files.append(buf.getvalue())
    spec = ViewSpec(224)
    out = {}
    for device in ("cpu", "cuda"):
        transform = ReadBoxes([spec])
        transform.epoch_seed = 5
        (view,), _ = collate_encoded([(transform(f, str(i), i), i) for i, f in enumerate(files)],
                                     decoder="dali")
        out[device] = view.to(device).resize(224)
    assert out["cuda"].device.type == "cuda" and out["cuda"].shape == (8, 3, 224, 224)
    diff = (out["cuda"].cpu().int() - out["cpu"].int()).abs().float()
    assert float(diff.mean()) <= 2, float(diff.mean())
