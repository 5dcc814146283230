"""FLOPs counted by torch.utils.flop_counter (what ``mae_bench.app.speed`` reports) against a hand
count written from the architecture alone: a ViT, MAE, and MAE's "encoder w/ [M]" ablation
(``encoder_mask_tokens``), forward and forward + backward.

What the counter counts (torch 2.x): 2*M*N*K per matmul (mm, addmm, bmm), the convolution of
the patch embedding, and the fused attention kernels of CUDA only. Elementwise work (softmax,
LayerNorm, GELU, bias adds, the loss) is free. On CPU ``F.scaled_dot_product_attention`` runs
``aten._scaled_dot_product_flash_attention_for_cpu``, which has no FLOP formula, so the fused
path counts no attention at all there; the explicit path (``set_fused_attention(False)``) counts
its two bmm per block. ``train_step_flops`` therefore always counts on the explicit path.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mae_bench.app.speed import train_step_flops
from mae_bench.config import RunConfig
from mae_bench.methods.registry import Batch, Method, build_method
from mae_bench.models.mae import build_mae
from mae_bench.models.vit import build_vit

pytestmark = pytest.mark.usefixtures("one_thread")

MASK_RATIO = 0.75


@dataclass(frozen=True)
class Arch:
    """The numbers a hand count needs, written out here (not read from the presets)."""

    img_size: int
    patch: int
    in_chans: int
    dim: int
    depth: int
    decoder_dim: int
    decoder_depth: int
    mlp_ratio: float = 4.0

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch) ** 2


MICRO4 = Arch(img_size=32, patch=4, in_chans=3, dim=32, depth=2, decoder_dim=32, decoder_depth=1)
TINY4 = Arch(img_size=32, patch=4, in_chans=3, dim=192, depth=12, decoder_dim=128,
             decoder_depth=4)


# --- the hand count (per image) ---------------------------------------------------------------


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """A Linear on ``tokens`` rows: one [T, d_in] x [d_in, d_out] matmul (bias add is free)."""
    return 2 * tokens * d_in * d_out


def vit_forward_flops(tokens: int, dim: int, depth: int, mlp_ratio: float,
                      attention: bool = True) -> int:
    """Forward FLOPs of ``depth`` pre-norm transformer blocks on ``tokens`` tokens of width
    ``dim``, per image. Per block: qkv (D -> 3D), proj (D -> D), fc1 (D -> rD), fc2 (rD -> D)
    and, if ``attention`` is counted, Q K^T and A V, each 2*T*T*D summed over the heads."""
    hidden = int(dim * mlp_ratio)
    per_block = (linear_flops(tokens, dim, 3 * dim) + linear_flops(tokens, dim, dim)
                 + linear_flops(tokens, dim, hidden) + linear_flops(tokens, hidden, dim))
    if attention:
        per_block += 2 * (2 * tokens * tokens * dim)
    return depth * per_block


def patch_embed_flops(a: Arch) -> int:
    """The conv with kernel = stride = p: L outputs of D channels, each a C*p*p dot product."""
    return 2 * a.num_patches * a.dim * a.in_chans * a.patch**2


def mae_matmul_flops(a: Arch, encoder_mask_tokens: bool, attention: bool = True) -> int:
    """MAE forward FLOPs per image other than the patch embedding: encoder, decoder_embed,
    decoder blocks, decoder_pred (the final norms, mask-token fill and loss are free)."""
    visible = int(a.num_patches * (1 - MASK_RATIO))  # K
    encoded = 1 + (a.num_patches if encoder_mask_tokens else visible)  # cls + K (or + L)
    decoded = 1 + a.num_patches  # the decoder always sees cls + L
    return (vit_forward_flops(encoded, a.dim, a.depth, a.mlp_ratio, attention)
            + linear_flops(encoded, a.dim, a.decoder_dim)
            + vit_forward_flops(decoded, a.decoder_dim, a.decoder_depth, a.mlp_ratio, attention)
            + linear_flops(decoded, a.decoder_dim, a.patch**2 * a.in_chans))


def mae_forward_flops(a: Arch, encoder_mask_tokens: bool, attention: bool = True) -> int:
    return patch_embed_flops(a) + mae_matmul_flops(a, encoder_mask_tokens, attention)


def mae_train_flops(a: Arch, encoder_mask_tokens: bool, attention: bool = True) -> int:
    """Forward + backward per image. A matmul Y = X W costs 2x its forward backward (dX = dY W^T
    and dW = X^T dY; the explicit attention bmm likewise, both operands need a gradient), and
    every token input does need dX (cls_token is trained). The patch-embedding conv's input is
    the image, which needs no gradient: the counter sees ``convolution_backward`` with the input
    gradient masked off and counts the weight gradient only, 1x forward."""
    return 2 * patch_embed_flops(a) + 3 * mae_matmul_flops(a, encoder_mask_tokens, attention)


# --- helpers ----------------------------------------------------------------------------------


def count(fn) -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter


def breakdown(counter: FlopCounterMode) -> dict[str, int]:
    """Per-op totals, for failure messages."""
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def micro_method(arch: str = "vit_micro_patch4", encoder_mask_tokens: bool = False) -> Method:
    cfg = RunConfig().replace(model={"arch": arch})
    if encoder_mask_tokens:
        cfg = cfg.replace(mae={"encoder_mask_tokens": True})
    torch.manual_seed(0)
    return build_method(cfg, 3, 32).train()


def image_batch(n: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(n, 3, 32, 32, generator=g)]
    return Batch(views, torch.full((n,), -1), torch.Generator().manual_seed(1), 0, 1)


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_vit_forward_flops_equal_hand_count(fused: bool) -> None:
    torch.manual_seed(0)
    vit = build_vit("vit_micro_patch4", 32, 3)  # num_classes 0: head is Identity, no FLOPs
    vit.set_fused_attention(fused)
    counter = count(lambda: vit(torch.randn(2, 3, 32, 32)))
    tokens = 1 + MICRO4.num_patches
    per_image = patch_embed_flops(MICRO4) + vit_forward_flops(
        tokens, MICRO4.dim, MICRO4.depth, MICRO4.mlp_ratio, attention=not fused)
    assert counter.get_total_flops() == 2 * per_image, breakdown(counter)


def test_fused_attention_has_no_flop_formula_on_cpu() -> None:
    """Why the fused path counts no attention on CPU; this fails (and the fused expectations
    with it) once torch learns to count the CPU kernel."""
    cpu_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert cpu_op not in FlopCounterMode(display=False).flop_registry
    q = torch.randn(1, 2, 5, 8)
    counter = count(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert counter.get_total_flops() == 0, breakdown(counter)


@pytest.mark.parametrize("encoder_mask_tokens", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_mae_forward_flops_equal_hand_count(encoder_mask_tokens: bool, fused: bool) -> None:
    torch.manual_seed(0)
    model = build_mae("vit_micro_patch4", 32, 3, encoder_mask_tokens=encoder_mask_tokens)
    model.set_fused_attention(fused)  # every timm Attention: encoder and decoder blocks
    assert all(b.attn.fused_attn == fused for b in model.decoder_blocks)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, MICRO4.num_patches)
    with torch.no_grad():
        counter = count(lambda: model(imgs, MASK_RATIO, noise))
    expected = 2 * mae_forward_flops(MICRO4, encoder_mask_tokens, attention=not fused)
    assert counter.get_total_flops() == expected, breakdown(counter)


@pytest.mark.parametrize("encoder_mask_tokens", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_train_step_flops_equal_hand_count(encoder_mask_tokens: bool, fused: bool) -> None:
    method = micro_method(encoder_mask_tokens=encoder_mask_tokens)
    method.mae.set_fused_attention(fused)
    # train_step_flops counts on the explicit attention path whatever the model runs (the CPU
    # fused kernel has no formula), so attention is in the count either way; the model's own
    # path is restored afterwards.
    flops = train_step_flops(method, image_batch(2))
    assert flops == 2 * mae_train_flops(MICRO4, encoder_mask_tokens)
    assert all(b.attn.fused_attn == fused for b in [*method.mae.blocks, *method.mae.decoder_blocks])
    # Per op: the conv backward is exactly 1x its forward (weight gradient only), each Linear's
    # backward (two mm) 2x its forward addmm, each explicit attention bmm 2x in backward.
    if not fused:
        ops = breakdown(count(lambda: method(image_batch(2))["loss"].backward()))
        conv = 2 * patch_embed_flops(MICRO4)
        assert ops["aten.convolution_backward"] == ops["aten.convolution"] == conv, ops
        assert ops["aten.mm"] == 2 * ops["aten.addmm"], ops
        attention = 2 * (mae_forward_flops(MICRO4, encoder_mask_tokens)
                         - mae_forward_flops(MICRO4, encoder_mask_tokens, attention=False))
        assert ops["aten.bmm"] == 3 * attention, ops


def test_encoder_mask_tokens_cost_ratio_of_vit_tiny() -> None:
    """The ablation's price per training step at 75 % masking, ViT-Tiny/4 on 32 px (L = 64,
    K = 16, 128-d 4-block decoder): about 2.8x, from the hand count, and the counter agrees."""
    ratio = Fraction(mae_train_flops(TINY4, True), mae_train_flops(TINY4, False))
    assert 2.5 < ratio < 3.2
    assert round(float(ratio), 2) == 2.85
    counted = {}
    for emt in (False, True):
        method = micro_method("vit_tiny_patch4", encoder_mask_tokens=emt)
        counted[emt] = train_step_flops(method, image_batch(1))
        assert counted[emt] == mae_train_flops(TINY4, emt)
    assert Fraction(counted[True], counted[False]) == ratio
