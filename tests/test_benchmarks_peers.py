"""benchmarks/peers.py: the checks that make its comparison honest.

The masking and loader tests need only torch and timm (they run in CI); the peer comparisons
skip unless lightly / transformers are installed (benchmark-only dependencies)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mae_bench.models.mae import build_mae, masking_indices
from mae_bench.models.vit import get_preset

ARCH = "vit_micro_patch4"


@pytest.fixture(scope="module")
def peers():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
    spec = importlib.util.spec_from_file_location("peers_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=gen), torch.rand(4, 64, generator=gen)


def test_lightly_indices_keep_the_patches_mae_bench_keeps(peers, inputs):
    _, noise = inputs
    idx_keep, idx_mask = peers.lightly_indices(noise, 0.75)
    ids_keep, mask, _ = masking_indices(noise, 0.75)
    assert (idx_keep[:, 0] == 0).all()  # the cls token, always kept
    assert torch.equal(idx_keep[:, 1:] - 1, ids_keep)
    masked = torch.zeros_like(mask).scatter(1, idx_mask - 1, 1.0)
    assert torch.equal(masked, mask)


def test_official_loader_shim_drops_qk_scale(peers, tmp_path, monkeypatch):
    # A stand-in file with the official imports and timm 0.3.2's Block call, not the model.
    (tmp_path / "util").mkdir()
    (tmp_path / "util" / "pos_embed.py").write_text(
        "import numpy as np\n\ndef grid(n):\n    return np.arange(n, dtype=np.float)\n")
    (tmp_path / "models_mae.py").write_text(
        "from timm.models.vision_transformer import PatchEmbed, Block  # noqa\n"
        "from util.pos_embed import grid\n\n"
        "class MaskedAutoencoderViT:\n"
        "    def __init__(self, qk_scale=None):\n"
        "        grid(4)\n"
        "        self.block = Block(32, 2, 4.0, qkv_bias=True, qk_scale=qk_scale)\n")
    import numpy as np

    monkeypatch.delitem(sys.modules, "util", raising=False)  # restored afterwards, as np.float
    monkeypatch.delitem(sys.modules, "util.pos_embed", raising=False)
    if "float" not in np.__dict__:
        monkeypatch.setattr(np, "float", float, raising=False)
        monkeypatch.delattr(np, "float")
    cls = peers.load_official(tmp_path / "models_mae.py")
    x = torch.randn(2, 5, 32)
    assert cls().block(x).shape == x.shape
    with pytest.raises(ValueError, match="qk_scale=0.5"):
        cls(qk_scale=0.5)
    import timm.models.vision_transformer as tvit
    assert "qk_scale" not in tvit.Block.__init__.__code__.co_varnames  # timm's own, restored


def test_transformers_port_gives_mae_bench_loss_at_the_same_weights(peers, inputs):
    pytest.importorskip("transformers")
    images, noise = inputs
    p = get_preset(ARCH)
    torch.manual_seed(0)
    ref = build_mae(ARCH, norm_pix_loss=True)
    hf = peers.hf_mae(p)
    hf.load_state_dict(peers.hf_state_dict(ref.state_dict(), p.depth, p.decoder_depth))
    assert peers.count_params(hf) == peers.count_params(ref)
    with torch.no_grad():
        want = ref(images, 0.75, noise)[0]
        tokens, got = peers.encoder_tokens(hf.vit.layers[0],
                                           lambda: hf(pixel_values=images, noise=noise).loss)
    assert tokens == [17]  # cls + 16 visible of 64 patches
    assert got == pytest.approx(float(want), abs=1e-5)


def test_lightly_example_gives_mae_bench_raw_pixel_loss(peers, inputs):
    pytest.importorskip("lightly")
    images, noise = inputs
    p = get_preset(ARCH)
    torch.manual_seed(0)
    ref = build_mae(ARCH, norm_pix_loss=False)
    model = peers.LightlyMAE(p)
    model.load_state_dict(peers.lightly_state_dict(ref.state_dict(),
                                                   model.backbone.mask_token.data))
    trainable, frozen = peers.count_params(model)
    # lightly's backbone holds a mask token the MAE example never uses
    assert (trainable - p.embed_dim, frozen) == peers.count_params(ref)
    keep = peers.lightly_indices(noise, 0.75)
    with torch.no_grad():
        want = ref(images, 0.75, noise)[0]
        tokens, got = peers.encoder_tokens(model.backbone.vit.blocks[0],
                                           lambda: model(images, *keep))
    assert tokens == [17]
    assert got == pytest.approx(float(want), abs=1e-5)
