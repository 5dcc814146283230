"""A second, deliberately naive MAE written from the paper and the official semantics, for tests.

Nothing here imports mae_bench: position embeddings are float64 numpy loops, patches are cut
one by one, attention is written out with softmax, and masking, decoding and the loss run one
sample at a time. Parameter names follow official ``models_mae.MaskedAutoencoderViT``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """[G*G (+1), D] float64. Token row*G+col; dims [0, D/2) encode col, [D/2, D) row; each half
    is [sin(pos * w_i) for i] + [cos(pos * w_i) for i], w_i = 10000 ** (-i / (D/4))."""
    quarter = embed_dim // 4
    out = np.zeros((grid_size * grid_size, embed_dim))
    for row in range(grid_size):
        for col in range(grid_size):
            token = row * grid_size + col
            for i in range(quarter):
                w = 10000.0 ** (-i / quarter)
                out[token, i] = math.sin(col * w)
                out[token, quarter + i] = math.cos(col * w)
                out[token, 2 * quarter + i] = math.sin(row * w)
                out[token, 3 * quarter + i] = math.cos(row * w)
    if cls_token:
        out = np.concatenate([np.zeros((1, embed_dim)), out], axis=0)
    return out


def patchify_loops(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C]; element (dy, dx, c) of patch (r, q) at (dy*p + dx)*C + c."""
    n, c, h, _ = imgs.shape
    g = h // p
    out = torch.zeros(n, g * g, p * p * c, dtype=imgs.dtype)
    for i in range(n):
        for r in range(g):
            for q in range(g):
                for dy in range(p):
                    for dx in range(p):
                        for ch in range(c):
                            value = imgs[i, ch, r * p + dy, q * p + dx]
                            out[i, r * g + q, (dy * p + dx) * c + ch] = value
    return out


def patch_loss(pred: torch.Tensor, target: torch.Tensor, masked: list[int], norm_pix: bool):
    """Mean over masked patches of the per-patch mean squared error, one patch at a time."""
    total = torch.zeros(())
    for k in masked:
        t = target[k]
        if norm_pix:
            mean = t.sum() / t.numel()
            var = ((t - mean) ** 2).sum() / (t.numel() - 1)
            t = (t - mean) / torch.sqrt(var + 1e-6)
        total = total + ((pred[k] - t) ** 2).mean()
    return total / len(masked)


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, d = x.shape  # one sample: [T, D]
        hd = d // self.heads
        qkv = self.qkv(x).reshape(t, 3, self.heads, hd)  # weight rows: (q|k|v, head, dim)
        outs = []
        for h in range(self.heads):
            q, k, v = qkv[:, 0, h], qkv[:, 1, h], qkv[:, 2, h]  # [T, hd]
            weights = torch.softmax(q @ k.T / math.sqrt(hd), dim=-1)  # [T, T]
            outs.append(weights @ v)
        return self.proj(torch.cat(outs, dim=-1))


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, p: int, c: int, d: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c, d, kernel_size=p, stride=p)


class ReferenceMAE(nn.Module):
    """Official parameter names, random weights (std 0.02), float64-computed sin-cos tables."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        decoder_embed_dim: int,
        decoder_depth: int,
        decoder_num_heads: int,
        mlp_ratio: float = 4.0,
        eps: float = 1e-6,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        self.p, self.c, self.g = patch_size, in_chans, img_size // patch_size
        self.norm_pix_loss = norm_pix_loss
        num = self.g * self.g
        self.patch_embed = RefPatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        table = torch.tensor(sincos_2d(embed_dim, self.g, True), dtype=torch.float32)
        self.pos_embed = nn.Parameter(table[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            RefBlock(embed_dim, num_heads, mlp_ratio, eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        table = torch.tensor(sincos_2d(decoder_embed_dim, self.g, True), dtype=torch.float32)
        self.decoder_pos_embed = nn.Parameter(table[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            RefBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio, eps)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        assert num + 1 == self.pos_embed.shape[1]
        with torch.no_grad():  # weights large enough that any wiring mistake shows
            for name, param in self.named_parameters():
                if "pos_embed" not in name:
                    param.copy_(torch.randn_like(param) * 0.2)
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.add_(1.0)

    def forward(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
        """Returns (loss, pred [N, L, p*p*C], mask [N, L]) one sample at a time."""
        n = imgs.shape[0]
        num = self.g * self.g
        keep_count = int(num * (1 - mask_ratio))
        target = patchify_loops(imgs, self.p)
        w = self.patch_embed.proj.weight.reshape(self.patch_embed.proj.weight.shape[0], -1)
        preds, mask, losses = [], torch.zeros(n, num), []
        for i in range(n):
            order = torch.argsort(noise[i], stable=True).tolist()
            keep, removed = order[:keep_count], order[keep_count:]
            mask[i, removed] = 1.0
            tokens = []
            for k in keep:  # patch k as a conv window: weight . pixels in (c, dy, dx) order
                r, q = divmod(k, self.g)
                pixels = imgs[i, :, r * self.p : (r + 1) * self.p, q * self.p : (q + 1) * self.p]
                emb = w @ pixels.reshape(-1) + self.patch_embed.proj.bias
                tokens.append(emb + self.pos_embed[0, 1 + k])
            x = torch.stack([self.cls_token[0, 0] + self.pos_embed[0, 0], *tokens])
            for blk in self.blocks:
                x = blk(x)
            x = self.decoder_embed(self.norm(x))  # [1+K, Dd]
            full = [self.mask_token[0, 0]] * num
            for j, k in enumerate(keep):
                full[k] = x[1 + j]
            x = torch.stack([x[0], *full]) + self.decoder_pos_embed[0]
            for blk in self.decoder_blocks:
                x = blk(x)
            pred = self.decoder_pred(self.decoder_norm(x))[1:]  # [L, p*p*C]
            preds.append(pred)
            losses.append(patch_loss(pred, target[i], removed, self.norm_pix_loss) * len(removed))
        loss = torch.stack(losses).sum() / mask.sum()
        return loss, torch.stack(preds), mask
