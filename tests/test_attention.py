"""The attention kernel rule: what it picks per (device, dtype, length), that a model applies it
per call under any autocast, and that both kernels compute the same function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention

from mae_bench.errors import ConfigError
from mae_bench.models.attention import (
    MATH_MAX_TOKENS,
    RuleAttention,
    attention_layers,
    rule_path,
    set_attention,
)
from mae_bench.models.mae import MaskedAutoencoder
from mae_bench.models.vit import VisionTransformer


@pytest.mark.parametrize(("device", "dtype", "tokens", "expected"), [
    ("cpu", torch.float32, 65, "fused"),  # fp32 on CPUs: the two are within a few percent
    ("cpu", torch.bfloat16, 17, "math"),  # MAE's visible tokens, bf16: flash backward is slow
    ("cpu", torch.bfloat16, 65, "math"),
    ("cpu", torch.float16, 197, "math"),
    ("cpu", torch.bfloat16, MATH_MAX_TOKENS, "math"),
    ("cpu", torch.bfloat16, MATH_MAX_TOKENS + 1, "fused"),  # the T x T scores grow too big
    ("cuda", torch.bfloat16, 65, "fused"),  # GPUs: flash / memory-efficient kernels
    ("cuda", torch.float32, 65, "fused"),
])
def test_rule(device, dtype, tokens, expected):
    assert rule_path(device, dtype, tokens) == expected


def _vit() -> VisionTransformer:
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_classes=3)


class _SdpaSpy:
    """Counts calls of F.scaled_dot_product_attention (the fused path) while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = F.scaled_dot_product_attention

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)


def test_a_model_applies_the_rule_per_call_under_autocast(monkeypatch):
    vit = _vit()
    assert all(isinstance(a, RuleAttention) and a.path == "auto" for a in attention_layers(vit))
    spy = _SdpaSpy(monkeypatch)
    x = torch.randn(2, 3, 16, 16)
    vit(x)  # fp32 on the CPU: fused in both blocks
    assert spy.calls == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a user's own bf16 loop: math
        vit(x).float().sum().backward()
    assert spy.calls == 2
    vit(x)  # back in fp32: fused again, without anything being reset
    assert spy.calls == 4


def test_a_forced_path_overrides_the_rule(monkeypatch):
    vit = _vit()
    spy = _SdpaSpy(monkeypatch)
    set_attention(vit, "fused")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vit(torch.randn(2, 3, 16, 16))
    assert spy.calls == 2
    vit.set_fused_attention(False)
    vit(torch.randn(2, 3, 16, 16))
    assert spy.calls == 2
    vit.set_fused_attention(None)  # back to the rule
    assert all(a.path == "auto" for a in attention_layers(vit))
    with pytest.raises(ConfigError, match="unknown attention path 'flash'"):
        set_attention(vit, "flash")


def test_mae_decoder_blocks_follow_the_rule_too():
    mae = MaskedAutoencoder(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    layers = attention_layers(mae)
    assert len(layers) == 2 and all(isinstance(a, RuleAttention) for a in layers)


def test_a_plain_timm_attention_becomes_a_rule_attention_with_the_same_weights():
    layer = Attention(32, 2, qkv_bias=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 5, 32)
    out = layer(x)
    set_attention(layer, "auto")
    assert isinstance(layer, RuleAttention) and layer.path == "auto"
    assert layer.state_dict().keys() == before.keys()
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
    assert torch.allclose(layer(x), out, atol=1e-6)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_both_kernels_give_the_same_outputs_and_gradients(dtype, atol):
    torch.manual_seed(0)
    vit = _vit().train()
    x = torch.randn(4, 3, 16, 16)
    got = {}
    for path in ("fused", "math"):
        set_attention(vit, path)
        vit.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = vit(x)  # [4, 3]
        out.float().square().mean().backward()
        got[path] = (out.float(), {n: p.grad.clone() for n, p in vit.named_parameters()
                                   if p.grad is not None})
    (out_f, grads_f), (out_m, grads_m) = got["fused"], got["math"]
    assert torch.allclose(out_f, out_m, atol=atol)
    assert grads_f.keys() == grads_m.keys() and len(grads_f) > 10
    for name, g in grads_f.items():
        scale = g.abs().max().clamp_min(1e-3)
        assert torch.allclose(g / scale, grads_m[name] / scale, atol=atol), name
