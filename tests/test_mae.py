"""Tests for mae_bench/models/mae.py: masking, the loss, the official layout, and agreement with the
independent reference in tests/reference_mae.py."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from reference_mae import ReferenceMAE, patch_loss, patchify_loops
from torch import nn

from mae_bench.errors import ConfigError
from mae_bench.models.mae import (
    MASK_STRATEGIES,
    MaskedAutoencoder,
    build_mae,
    grid_step,
    len_keep,
    masking_indices,
    masking_noise,
    random_masking,
    validate_mask_ratio,
)
from mae_bench.models.vit import PRESETS, VisionTransformer

BLOCK_KEYS = [
    f"{m}.{t}"
    for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for t in ("weight", "bias")
]


def official_keys(depth: int, decoder_depth: int) -> list[str]:
    """The state-dict keys of official models_mae.MaskedAutoencoderViT, in its order."""
    keys = [
        "cls_token",
        "pos_embed",
        "mask_token",
        "decoder_pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    ]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS]
    keys += ["norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias"]
    keys += [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in BLOCK_KEYS]
    return keys + [
        "decoder_norm.weight",
        "decoder_norm.bias",
        "decoder_pred.weight",
        "decoder_pred.bias",
    ]


def official_block_shapes(d: int) -> dict[str, tuple[int, ...]]:
    return {
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d),
        "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d),
        "attn.proj.bias": (d,),
        "norm2.weight": (d,),
        "norm2.bias": (d,),
        "mlp.fc1.weight": (4 * d, d),
        "mlp.fc1.bias": (4 * d,),
        "mlp.fc2.weight": (d, 4 * d),
        "mlp.fc2.bias": (d,),
    }


MICRO = dict(
    img_size=32,
    patch_size=4,
    in_chans=3,
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
)


def micro_pair(norm_pix_loss: bool = False, **overrides) -> tuple[MaskedAutoencoder, ReferenceMAE]:
    """Our model loaded strictly with the reference's random weights, and the reference."""
    cfg = {**MICRO, **overrides}
    ref = ReferenceMAE(**cfg, norm_pix_loss=norm_pix_loss)
    ours = MaskedAutoencoder(
        **cfg, norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=norm_pix_loss
    )
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.fixture(scope="module")
def mae_base() -> MaskedAutoencoder:
    torch.manual_seed(0)
    return build_mae("vit_base_patch16")


# --- official layout --------------------------------------------------------------------------


def test_vit_base_state_dict_matches_official_keys_and_shapes(mae_base: MaskedAutoencoder) -> None:
    state = mae_base.state_dict()
    assert list(state) == official_keys(12, 8)
    expected = {
        "cls_token": (1, 1, 768),
        "pos_embed": (1, 197, 768),
        "mask_token": (1, 1, 512),
        "decoder_pos_embed": (1, 197, 512),
        "patch_embed.proj.weight": (768, 3, 16, 16),
        "patch_embed.proj.bias": (768,),
        "norm.weight": (768,),
        "norm.bias": (768,),
        "decoder_embed.weight": (512, 768),
        "decoder_embed.bias": (512,),
        "decoder_norm.weight": (512,),
        "decoder_norm.bias": (512,),
        "decoder_pred.weight": (768, 512),
        "decoder_pred.bias": (768,),
    }
    for i in range(12):
        expected |= {f"blocks.{i}.{k}": s for k, s in official_block_shapes(768).items()}
    for i in range(8):
        expected |= {f"decoder_blocks.{i}.{k}": s for k, s in official_block_shapes(512).items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # official pretrain checkpoints store exactly these tensors under ckpt["model"]
    mae_base.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)


def test_vit_base_parameter_counts(mae_base: MaskedAutoencoder) -> None:
    total = sum(p.numel() for p in mae_base.parameters())
    encoder = sum(v.numel() for v in mae_base.encoder_state_dict().values())
    assert encoder == 85_798_656  # timm vit_base_patch16_224 (86.57M) minus its 1000-class head
    assert total - encoder == 26_109_184
    assert round(total / 1e6, 1) == 111.9  # MAE ViT-B with the 512-d 8-block decoder
    fixed = {n for n, p in mae_base.named_parameters() if not p.requires_grad}
    assert fixed == {"pos_embed", "decoder_pos_embed"}


def test_reference_state_dict_loads_strictly_and_survives_weights_only(tmp_path) -> None:
    ref = ReferenceMAE(**MICRO)
    torch.save({"model": ref.state_dict()}, tmp_path / "ckpt.pth")
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    ours = build_mae("vit_micro_patch4")
    assert list(ours.state_dict()) == list(ckpt["model"]) == official_keys(2, 1)
    ours.load_state_dict(ckpt["model"], strict=True)
    assert torch.equal(ours.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)


# --- agreement with the reference -------------------------------------------------------------


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("strategy", ["random", "block"])
def test_same_weights_and_noise_give_reference_outputs(norm_pix_loss: bool, strategy: str) -> None:
    torch.manual_seed(1)
    ours, ref = micro_pair(norm_pix_loss)
    imgs = torch.randn(3, 3, 32, 32)
    noise = masking_noise(strategy, 3, 8, 0.75, generator=torch.Generator().manual_seed(2))
    loss, pred, mask = ours(imgs, mask_ratio=0.75, noise=noise)
    with torch.no_grad():
        ref_loss, ref_pred, ref_mask = ref(imgs, 0.75, noise)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(pred, ref_pred, atol=1e-5)
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert pred.abs().mean() > 0.1  # the comparison is not between near-zero tensors


def test_one_channel_model_matches_reference() -> None:
    torch.manual_seed(3)
    ours, ref = micro_pair(img_size=16, patch_size=2, in_chans=1)
    imgs = torch.randn(2, 1, 16, 16)
    noise = torch.rand(2, 64)
    loss, pred, mask = ours(imgs, mask_ratio=0.5, noise=noise)
    ref_loss, ref_pred, ref_mask = ref(imgs, 0.5, noise)
    assert pred.shape == (2, 64, 4) and torch.equal(mask, ref_mask)
    assert torch.allclose(pred, ref_pred, atol=1e-5) and torch.allclose(loss, ref_loss, atol=1e-5)
    assert ours.unpatchify(ours.patchify(imgs)).shape == (2, 1, 16, 16)


def test_default_masking_draws_the_official_random_noise() -> None:
    model = build_mae("vit_micro_patch4")
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(7)
    _, pred, mask = model(imgs)
    torch.manual_seed(7)
    noise = torch.rand(2, 64)  # what official random_masking draws
    _, pred2, mask2 = model(imgs, noise=noise)
    assert torch.equal(mask, mask2) and torch.equal(pred, pred2)


# --- the loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_only_counts_masked_patches(norm_pix_loss: bool) -> None:
    model = build_mae("vit_micro_patch4", norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs, 0.75, torch.rand(2, 64))
    visible = (mask == 0).unsqueeze(-1)  # [N, L, 1]
    moved_visible = pred + 5.0 * visible
    moved_masked = pred + 5.0 * ~visible
    assert torch.equal(model.forward_loss(imgs, moved_visible, mask), loss)
    assert model.forward_loss(imgs, moved_masked, mask) > loss + 1.0


def test_norm_pix_target_matches_hand_computation() -> None:
    model = build_mae("vit_micro_patch4", norm_pix_loss=True)
    imgs = torch.rand(2, 3, 32, 32) * 4 + 1
    pred = torch.randn(2, 64, 48)
    mask = (torch.rand(2, 64) < 0.5).float()
    target = patchify_loops(imgs, 4)
    per_sample = [
        patch_loss(pred[i], target[i], mask[i].nonzero().flatten().tolist(), True) * mask[i].sum()
        for i in range(2)
    ]
    expected = sum(per_sample) / mask.sum()
    assert torch.allclose(model.forward_loss(imgs, pred, mask), expected, atol=1e-5)
    # with pred = the normalised target, the loss vanishes; the raw target does not
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert model.forward_loss(imgs, normed, mask) < 1e-10
    assert model.forward_loss(imgs, target, mask) > 1.0


def test_gradients_reach_encoder_and_mask_token_not_pos_embed() -> None:
    model = build_mae("vit_micro_patch4")
    loss, _, _ = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert model.pos_embed.grad is None and model.decoder_pos_embed.grad is None
    assert model.mask_token.grad.abs().sum() > 0 and model.cls_token.grad.abs().sum() > 0
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "mask_token"}


# --- masking ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", sorted(MASK_STRATEGIES))
@pytest.mark.parametrize("ratio", [0.75, 0.9375])
def test_every_strategy_keeps_exactly_len_keep_patches(strategy: str, ratio: float) -> None:
    noise = masking_noise(strategy, 8, 8, ratio, generator=torch.Generator().manual_seed(0))
    ids_keep, mask, ids_restore = masking_indices(noise, ratio)
    keep = len_keep(64, ratio)
    assert keep == (16 if ratio == 0.75 else 4)
    assert ids_keep.shape == (8, keep)
    assert torch.equal(mask.sum(1), torch.full((8,), 64.0 - keep))
    assert len({tuple(row.tolist()) for row in mask}) > 1  # masks differ between samples
    kept = torch.zeros(8, 64).scatter_(1, ids_keep, 1.0)
    assert torch.equal(kept, 1 - mask)


def test_ids_restore_inverts_the_shuffle_and_random_masking_gathers() -> None:
    x = torch.randn(4, 16, 8)
    noise = torch.rand(4, 16)
    x_masked, mask, ids_restore, ids_keep = random_masking(x, 0.75, noise)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(16).expand(4, 16))
    assert torch.equal(ids_keep, ids_shuffle[:, :4])
    for i in range(4):
        smallest = sorted(range(16), key=lambda k: noise[i, k].item())[:4]
        assert torch.equal(x_masked[i], x[i, smallest])
        assert mask[i, smallest].sum() == 0 and mask[i].sum() == 12


def test_noise_replays_and_generator_is_deterministic() -> None:
    model = build_mae("vit_micro_patch4", mask_strategy="block")
    imgs = torch.randn(2, 3, 32, 32)
    make = partial(masking_noise, "block", 2, 8, 0.75)
    noise = make(generator=torch.Generator().manual_seed(5))
    assert torch.equal(noise, make(generator=torch.Generator().manual_seed(5)))
    first, second = model(imgs, 0.75, noise), model(imgs, 0.75, noise.clone())
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other = model(imgs, 0.75, make(generator=torch.Generator().manual_seed(6)))
    assert not torch.equal(first[2], other[2])


def _masked_neighbour_fraction(mask: torch.Tensor, grid: int) -> float:
    m = mask.reshape(-1, grid, grid)
    pairs = (m[:, 1:] * m[:, :-1]).sum() + (m[:, :, 1:] * m[:, :, :-1]).sum()
    return (2 * pairs / (4 * m.sum())).item()


def test_block_masking_is_blocky_and_uses_noise_bands() -> None:
    gen = torch.Generator().manual_seed(0)
    noise = masking_noise("block", 16, 14, 0.5, generator=gen)
    covered = noise >= 1
    assert ((noise >= 0) & (noise < 2)).all()
    assert (covered.sum(1) - 98).abs().max() <= 4  # blocks fill the budget up to a few patches
    _, block_mask, _ = masking_indices(noise, 0.5)
    _, random_mask, _ = masking_indices(masking_noise("random", 16, 14, 0.5, gen), 0.5)
    assert torch.equal(block_mask.sum(1), torch.full((16,), 98.0))
    assert (
        _masked_neighbour_fraction(block_mask, 14)
        > _masked_neighbour_fraction(random_mask, 14) + 0.15
    )


def test_grid_masking_keeps_one_patch_per_cell() -> None:
    noise = masking_noise("grid", 8, 8, 0.75, generator=torch.Generator().manual_seed(0))
    _, mask, _ = masking_indices(noise, 0.75)
    offsets = set()
    for sample in mask.reshape(8, 8, 8):
        rows, cols = (sample == 0).nonzero(as_tuple=True)
        assert len(rows) == 16
        assert len({(r % 2, c % 2) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)}) == 1
        offsets.add((rows[0].item() % 2, cols[0].item() % 2))
    assert len(offsets) > 1  # a random offset per sample
    assert grid_step(8, 0.75) == 2 and grid_step(8, 0.9375) == 4 and grid_step(9, 1 - 1 / 9) == 3


def test_grid_masking_rejects_ratios_off_the_lattice() -> None:
    with pytest.raises(
        ConfigError,
        match=r"on a 8x8 patch grid mask_ratio must be one of: "
        r"0\.75 \(2x2\), 0\.9375 \(4x4\), 0\.984375 \(8x8\); "
        r"got 0\.6",
    ):
        masking_noise("grid", 2, 8, 0.6)
    with pytest.raises(ConfigError, match="one of: 0.75"):
        MaskedAutoencoder(**MICRO, mask_strategy="grid")(torch.randn(1, 3, 32, 32), 0.5)


def test_mask_ratio_validation_messages() -> None:
    validate_mask_ratio(64, 0.984375)  # one visible patch is fine
    with pytest.raises(
        ConfigError,
        match=r"mask_ratio=0\.0 leaves 64 of 64 patches visible; "
        r"with 64 patches use 0 < mask_ratio <= 0\.9843",
    ):
        validate_mask_ratio(64, 0.0)
    with pytest.raises(ConfigError, match=r"mask_ratio=0\.99 leaves 0 of 64 patches visible"):
        validate_mask_ratio(64, 0.99)
    with pytest.raises(ConfigError, match="mask_ratio=nan leaves 0 of 196"):
        validate_mask_ratio(196, float("nan"))
    with pytest.raises(ConfigError, match="mask_ratio=1.0 leaves 0 of 64"):
        build_mae("vit_micro_patch4")(torch.randn(1, 3, 32, 32), mask_ratio=1.0)


def test_unknown_strategy_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown mask_strategy 'tube'; valid: random, block"):
        masking_noise("tube", 2, 4, 0.5)
    with pytest.raises(ConfigError, match="unknown mask_strategy 'tube'"):
        MaskedAutoencoder(**MICRO, mask_strategy="tube")


# --- encoder ----------------------------------------------------------------------------------


def test_encoder_sees_only_visible_tokens() -> None:
    model = build_mae("vit_micro_patch4")
    shapes: dict[str, torch.Size] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            shapes[name] = args[0].shape

        return hook

    model.blocks[0].register_forward_hook(record("enc"))
    model.decoder_blocks[0].register_forward_hook(record("dec"))
    latent, mask, ids_restore = model.forward_encoder(torch.randn(2, 3, 32, 32), 0.75)
    assert latent.shape == (2, 17, 32) and shapes["enc"] == (2, 17, 32)
    model.forward_decoder(latent, ids_restore)
    assert shapes["dec"] == (2, 65, 32)


def test_encoder_state_dict_loads_into_vit_and_gives_same_features() -> None:
    model = build_mae("vit_micro_patch4")
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    state = model.encoder_state_dict()
    assert list(state) == list(vit.state_dict())
    vit.load_state_dict(state, strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.allclose(vit.forward_features(imgs), model.forward_features(imgs), atol=1e-6)
    assert torch.allclose(model.make_encoder()(imgs), vit(imgs), atol=1e-6)
    finetune = model.make_encoder(global_pool="avg", num_classes=5)
    assert torch.equal(finetune.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    assert torch.equal(finetune.fc_norm.weight, torch.ones(32)) and finetune(imgs).shape == (2, 5)


def test_fused_attention_toggle_keeps_mae_outputs() -> None:
    model = build_mae("vit_micro_patch4").eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    model.set_fused_attention(True)
    loss, pred, _ = model(imgs, 0.75, noise)
    model.set_fused_attention(False)
    loss2, pred2, _ = model(imgs, 0.75, noise)
    assert not model.decoder_blocks[0].attn.fused_attn
    assert torch.allclose(pred, pred2, atol=1e-5) and torch.allclose(loss, loss2, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_an_mae(name: str) -> None:
    p = PRESETS[name]
    with torch.device("meta"):
        model = build_mae(name)
    assert list(model.state_dict()) == official_keys(p.depth, p.decoder_depth)
    assert model.decoder_pred.out_features == p.patch_size**2 * 3
    assert model.decoder_norm.eps == 1e-6


@pytest.mark.parametrize("name", ["vit_micro_patch2", "vit_micro_patch4"])
def test_micro_presets_train_a_step(name: str) -> None:
    torch.manual_seed(0)
    model = build_mae(name)
    side = PRESETS[name].img_size
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    imgs, noise = torch.randn(4, 3, side, side), torch.rand(4, model.num_patches)
    before, _, _ = model(imgs, 0.75, noise)
    before.backward()
    opt.step()
    after, _, _ = model(imgs, 0.75, noise)
    assert after < before


# --- "encoder w/ [M]" (encoder_mask_tokens, paper Table 1c) -----------------------------------


def variant_pair(
    norm_pix_loss: bool = False,
) -> tuple[MaskedAutoencoder, ReferenceMAE, torch.Tensor]:
    """The ablation loaded strictly with the reference's random weights (its decoder mask_token
    swapped for a random encoder mask token), the reference, and that token [D]."""
    ref = ReferenceMAE(**MICRO, norm_pix_loss=norm_pix_loss)
    token = torch.randn(1, 1, MICRO["embed_dim"]) * 0.2
    state = {k: v for k, v in ref.state_dict().items() if k != "mask_token"}
    ours = MaskedAutoencoder(**MICRO, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             norm_pix_loss=norm_pix_loss, encoder_mask_tokens=True)
    ours.load_state_dict(state | {"encoder_mask_token": token}, strict=True)
    return ours, ref, token[0, 0]


def reference_with_encoder_mask_tokens(
    ref: ReferenceMAE, token: torch.Tensor, imgs: torch.Tensor, mask_ratio: float,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's "encoder w/ [M]" written one sample at a time from the reference's modules:
    all L positions through the encoder (a masked one as ``token`` + its position), then the
    decoder on the L encoded tokens with no mask token. Returns (loss, pred [N, L, p*p*C])."""
    n, num = imgs.shape[0], ref.g * ref.g
    keep_count = int(num * (1 - mask_ratio))
    target = patchify_loops(imgs, ref.p)
    w = ref.patch_embed.proj.weight.reshape(ref.patch_embed.proj.weight.shape[0], -1)
    preds, losses, masked_total = [], [], 0
    for i in range(n):
        removed = torch.argsort(noise[i], stable=True).tolist()[keep_count:]
        tokens = []
        for k in range(num):
            r, q = divmod(k, ref.g)
            pixels = imgs[i, :, r * ref.p:(r + 1) * ref.p, q * ref.p:(q + 1) * ref.p]
            emb = token if k in removed else w @ pixels.reshape(-1) + ref.patch_embed.proj.bias
            tokens.append(emb + ref.pos_embed[0, 1 + k])
        x = torch.stack([ref.cls_token[0, 0] + ref.pos_embed[0, 0], *tokens])  # [1+L, D]
        for blk in ref.blocks:
            x = blk(x)
        x = ref.decoder_embed(ref.norm(x)) + ref.decoder_pos_embed[0]  # [1+L, Dd]
        for blk in ref.decoder_blocks:
            x = blk(x)
        pred = ref.decoder_pred(ref.decoder_norm(x))[1:]  # [L, p*p*C]
        preds.append(pred)
        losses.append(patch_loss(pred, target[i], removed, ref.norm_pix_loss) * len(removed))
        masked_total += len(removed)
    return torch.stack(losses).sum() / masked_total, torch.stack(preds)


def pixel_mask(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, L] patch mask (row-major grid) -> [N, 1, H, W] pixel mask."""
    n, num = mask.shape
    grid = int(num**0.5)
    m = mask.reshape(n, 1, grid, grid)  # [N, 1, G, G]
    return m.repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # [N, 1, H, W]


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_encoder_mask_tokens_match_the_reference(norm_pix_loss: bool) -> None:
    torch.manual_seed(4)
    ours, ref, token = variant_pair(norm_pix_loss)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    loss, pred, mask = ours(imgs, 0.75, noise)
    with torch.no_grad():
        ref_loss, ref_pred = reference_with_encoder_mask_tokens(ref, token, imgs, 0.75, noise)
    assert mask.sum() == 2 * 48
    assert torch.allclose(pred, ref_pred, atol=1e-5) and torch.allclose(loss, ref_loss, atol=1e-5)
    assert pred.abs().mean() > 0.1  # the comparison is not between near-zero tensors


def test_encoder_mask_tokens_state_dict_and_encoder() -> None:
    model = build_mae("vit_micro_patch4", encoder_mask_tokens=True)
    keys = list(model.state_dict())
    # the official layout, with the mask token moved from decoder width to encoder width
    expected = ["encoder_mask_token" if k == "mask_token" else k for k in official_keys(2, 1)]
    assert keys == expected and "mask_token" not in keys
    assert model.encoder_mask_token.shape == (1, 1, 32)
    assert model.encoder_mask_token.std() > 0  # initialised (normal, std 0.02), not left zero
    state = model.encoder_state_dict()
    assert "encoder_mask_token" not in state and "mask_token" not in state
    assert list(state) == list(build_mae("vit_micro_patch4").encoder_state_dict())
    encoder = model.make_encoder()
    assert list(encoder.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.allclose(encoder.forward_features(imgs), model.forward_features(imgs), atol=1e-6)


def test_default_mae_state_dict_keeps_the_decoder_mask_token() -> None:
    model = build_mae("vit_micro_patch4")
    keys = list(model.state_dict())
    assert "mask_token" in keys and "encoder_mask_token" not in keys
    assert keys == official_keys(2, 1) and model.mask_token.shape == (1, 1, 32)


def test_encoder_mask_tokens_encoder_sees_the_token_not_the_masked_pixels() -> None:
    torch.manual_seed(5)
    model = build_mae("vit_micro_patch4", encoder_mask_tokens=True).eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    inputs: list[torch.Tensor] = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (2, 65, 32) and mask.shape == ids_restore.shape == (2, 64)
    assert torch.equal(mask.sum(1), torch.tensor([48.0, 48.0]))
    # the first block's input at a masked position is the shared token plus that position
    x = inputs[0]  # [N, 1+L, D]
    masked = mask.bool()  # [N, L]
    want = (model.encoder_mask_token[0] + model.pos_embed[0, 1:]).expand(2, -1, -1)  # [N, L, D]
    assert torch.equal(x[:, 1:][masked], want[masked])
    assert not torch.allclose(x[:, 1:][~masked], want[~masked])
    # so the masked pixels cannot reach the latent; a visible patch's pixels do
    where = pixel_mask(mask, 4)  # [N, 1, H, W]
    other_masked = imgs + 3.0 * torch.randn_like(imgs) * where
    other_visible = imgs + 3.0 * torch.randn_like(imgs) * (1 - where)
    assert torch.equal(model.forward_encoder(other_masked, 0.75, noise)[0], latent)
    assert not torch.allclose(model.forward_encoder(other_visible, 0.75, noise)[0], latent)


def test_encoder_mask_tokens_loss_and_gradients() -> None:
    torch.manual_seed(6)
    model = build_mae("vit_micro_patch4", encoder_mask_tokens=True, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs, 0.75, torch.rand(2, 64))
    assert torch.isfinite(loss) and pred.shape == (2, 64, 48)
    visible = (mask == 0).unsqueeze(-1)  # [N, L, 1]
    assert torch.equal(model.forward_loss(imgs, pred.detach() + 5.0 * visible, mask), loss)
    loss.backward()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert model.pos_embed.grad is None and model.decoder_pos_embed.grad is None
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder_mask_token" in trainable and "mask_token" not in trainable
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.isfinite().all()]
    assert not missing
    assert model.encoder_mask_token.grad.abs().sum() > 0
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "encoder_mask_token"}


def test_encoder_mask_tokens_knob_and_config_digest() -> None:
    from mae_bench.config import RunConfig

    default = RunConfig()
    assert default.mae.encoder_mask_tokens is None
    assert default.replace(mae={"encoder_mask_tokens": None}).digest() == default.digest()
    assert default.replace(mae={"encoder_mask_tokens": True}).digest() != default.digest()


def test_cpu_generator_keeps_a_cpu_stream_and_replays_the_step():
    """Mask draws made on the CPU use the step's own CPU generator (the stream the sibling
    tests replay); a generator of another device gives a CPU generator seeded from one of its
    draws, the same for the same state (so display_mask replays the training step)."""
    from mae_bench.models.masking import cpu_generator

    gen = torch.Generator().manual_seed(3)
    assert cpu_generator(gen) is gen and cpu_generator(None) is None
    if torch.cuda.is_available():  # the GPU check (benchmarks/gpu_check.sh) runs this branch
        cuda = torch.Generator(device="cuda").manual_seed(3)
        state = cuda.get_state()
        a = torch.rand(4, generator=cpu_generator(cuda))
        cuda.set_state(state)
        assert torch.equal(a, torch.rand(4, generator=cpu_generator(cuda)))
