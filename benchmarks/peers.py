"""mae-bench's training step against its peers', side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/peers.py --arch vit_tiny_patch4 --batch-size 128 \
        --rounds 3 --markdown results/speed/peers-spr-cpu.md
    python benchmarks/peers.py --official-mae ../mae/models_mae.py   # + facebookresearch/mae

What runs, each in fp32 and under bf16 autocast (``--precisions``), on the same input tensors,
the same architecture (``--arch``), the same batch and AdamW:

* MAE: mae-bench's ``MaskedAutoencoder`` in a plain loop (as a user of the class trains it) and
  through the engine's ``TrainStep`` (param groups, foreach AdamW: what ``mae-bench pretrain``
  runs); lightly 1.6.0's documented MAE example (``MaskedVisionTransformerTIMM`` over a timm
  ``VisionTransformer``, ``MaskedVisionTransformerDecoderTIMM``: 1.6.0 deprecates
  ``MAEDecoderTIMM`` for it and its example uses it; same layers, same parameters); transformers'
  ``ViTMAEForPreTraining``; the official ``models_mae.py`` with ``--official-mae PATH`` (a file of a
  facebookresearch/mae checkout, loaded with a shim: timm 1.x's ``Block`` has no ``qk_scale``).
  mae-bench, lightly and transformers get the same masking noise; the official forward takes none
  and draws its own.
* SimCLR: mae-bench's SimCLR method (plain loop and engine step) against lightly's SimCLR example
  (a timm ViT of the same preset, ``SimCLRProjectionHead``, ``NTXentLoss``), both on the same two
  views given as tensors (no augmentation inside the timed step).

Every peer is called as its own users call it, with its defaults (timm's and transformers'
attention kernel included). Before timing, the script checks the comparison: parameter counts,
the tokens each encoder sees per call, and the loss at the same weights (mae-bench's weights are
copied into lightly's, transformers' and the official model, so their losses must agree with
mae-bench's to float rounding; lightly's example regresses raw pixels, so it is compared with
mae-bench's loss without ``norm_pix_loss``).

Timing: ``--warmup`` untimed steps of every configuration first (lazy init, kernel caches, the
allocator), then ``--rounds`` round-robin rounds of ``--steps`` timed steps each, the order
rotated every round, so that a busy spell of a shared machine hits every configuration alike
(many short rounds spread it best). A row is the median img/s over its timed steps, with the
interquartile range, p75 / p25 and the slowest step over the fastest beside it; a ratio is a
median over a median. A p75 / p25 above 1.25 prints a warning: the machine was busy.

Missing peer packages: a one-line error naming the pip command, exit 2, before anything runs;
with ``--skip-missing`` their rows say "not measured" and everything else is measured. lightly
and transformers are benchmark-only dependencies, never mae-bench's:
``pip install lightly==1.6.0 transformers``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from mae_bench.config import RunConfig
from mae_bench.methods.engine import build_optimizer, build_train_step
from mae_bench.methods.method import Batch
from mae_bench.methods.registry import build_method, resolve_config
from mae_bench.models.attention import rule_path
from mae_bench.models.mae import build_mae
from mae_bench.models.masking import len_keep
from mae_bench.models.vit import ArchPreset, get_preset
from mae_bench.training.host_memory import describe as host_allocator
from mae_bench.training.host_memory import keep_freed_memory

PEERS = {"lightly": "pip install lightly==1.6.0", "transformers": "pip install transformers"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MASK_RATIO = 0.75
LR = 1.5e-4  # the same AdamW for every plain loop; the value does not change the cost
ADAMW = {"lr": LR, "betas": (0.9, 0.95), "weight_decay": 0.05}
MB, MB_ENGINE = "mae-bench", "mae-bench engine step"
LIGHTLY, HF, OFFICIAL = "lightly 1.6.0 example", "transformers ViTMAE", "official models_mae.py"
ORDER = [MB, MB_ENGINE, LIGHTLY, HF, OFFICIAL]  # the report's row order
BUSY_SPREAD = 1.25  # p75 / p25 of a row's step times above which the machine was not quiet


@dataclass
class Case:
    """One configuration: a training step to time and what the checks found."""

    name: str
    task: str  # "MAE" | "SimCLR"
    precision: str
    step: Callable[[], Tensor]  # one training step (forward, backward, AdamW); returns the loss
    attention: str
    ips: list[float] = field(default_factory=list)
    loss: float = float("nan")


# --- the machine -------------------------------------------------------------------------------


def cpu_summary() -> str:
    """The CPU model, family / model numbers and whether it has amx_bf16 / avx512_bf16."""
    try:
        first = open("/proc/cpuinfo").read().split("\n\n")[0]
    except OSError:
        return "unknown CPU (no /proc/cpuinfo)"
    info = dict(ln.split(":", 1) for ln in first.splitlines() if ":" in ln)
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = info.get("flags", "").split()
    has = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("amx_bf16", "avx512_bf16"))
    return (f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')} "
            f"model {info.get('model', '?')}; {has})")


# --- weights shared across implementations ----------------------------------------------------


def _linear(out: dict[str, Tensor], dst: str, sd: dict[str, Tensor], src: str) -> None:
    out[dst + ".weight"], out[dst + ".bias"] = sd[src + ".weight"], sd[src + ".bias"]


def hf_state_dict(sd: dict[str, Tensor], depth: int, decoder_depth: int) -> dict[str, Tensor]:
    """mae-bench / official MAE keys -> transformers ViTMAEForPreTraining keys (qkv split)."""
    out = {"vit.embeddings.cls_token": sd["cls_token"],
           "vit.embeddings.position_embeddings": sd["pos_embed"],
           "decoder.mask_token": sd["mask_token"],
           "decoder.decoder_pos_embed": sd["decoder_pos_embed"]}
    for dst, src in (("vit.embeddings.patch_embeddings.projection", "patch_embed.proj"),
                     ("vit.layernorm", "norm"), ("decoder.decoder_embed", "decoder_embed"),
                     ("decoder.decoder_norm", "decoder_norm"),
                     ("decoder.decoder_pred", "decoder_pred")):
        _linear(out, dst, sd, src)
    for src_prefix, dst_prefix, n in (("blocks", "vit.layers", depth),
                                      ("decoder_blocks", "decoder.decoder_layers", decoder_depth)):
        for i in range(n):
            s, d = f"{src_prefix}.{i}.", f"{dst_prefix}.{i}."
            for part in ("weight", "bias"):
                q, k, v = sd[f"{s}attn.qkv.{part}"].chunk(3)  # timm's qkv: q, k, v stacked
                out |= {f"{d}attention.q_proj.{part}": q, f"{d}attention.k_proj.{part}": k,
                        f"{d}attention.v_proj.{part}": v}
            for dst, src in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                             ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"),
                             ("mlp.fc2", "mlp.fc2")):
                _linear(out, d + dst, sd, s + src)
    return out


def lightly_state_dict(sd: dict[str, Tensor], backbone_mask_token: Tensor) -> dict[str, Tensor]:
    """mae-bench MAE keys -> the lightly example's keys (timm's encoder keys are mae-bench's)."""
    out = {"backbone.mask_token": backbone_mask_token, "decoder.mask_token": sd["mask_token"],
           "decoder.pos_embed": sd["decoder_pos_embed"]}
    for k, v in sd.items():
        if not k.startswith(("decoder", "mask_token")):
            out["backbone.vit." + k] = v
        elif k.startswith("decoder_blocks."):
            out["decoder.blocks." + k.removeprefix("decoder_blocks.")] = v
    for dst, src in (("decoder_embed", "decoder_embed"), ("decoder.norm", "decoder_norm"),
                     ("prediction_head", "decoder_pred")):
        _linear(out, dst, sd, src)
    return out


# --- the peers' models, as their documentation builds them ----------------------------------


def timm_vit(p: ArchPreset) -> nn.Module:
    """timm's VisionTransformer of the preset (no classifier head: no peer trains one)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=p.img_size, patch_size=p.patch_size, embed_dim=p.embed_dim,
                             depth=p.depth, num_heads=p.num_heads, mlp_ratio=p.mlp_ratio,
                             num_classes=0)


class LightlyMAE(nn.Module):
    """lightly 1.6.0's MAE example (examples/pytorch/mae.py) on a timm ViT of the preset."""

    def __init__(self, p: ArchPreset) -> None:
        from lightly.models.modules import (
            MaskedVisionTransformerDecoderTIMM,
            MaskedVisionTransformerTIMM,
        )

        super().__init__()
        vit = timm_vit(p)
        self.patch_size = p.patch_size
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder_embed = nn.Linear(vit.embed_dim, p.decoder_embed_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=p.decoder_embed_dim,
            depth=p.decoder_depth, num_heads=p.decoder_num_heads,
            num_prefix_tokens=vit.num_prefix_tokens, mlp_ratio=p.mlp_ratio)
        self.prediction_head = nn.Linear(p.decoder_embed_dim, p.patch_size**2 * 3)
        self.criterion = nn.MSELoss()

    def forward(self, images: Tensor, idx_keep: Tensor, idx_mask: Tensor) -> Tensor:
        from lightly.models import utils

        x_encoded = self.backbone.encode(images=images, idx_keep=idx_keep)  # [N, 1+K, D]
        x_decode = self.decoder_embed(x_encoded)  # [N, 1+K, Dd]
        x_masked = x_decode.new_zeros(images.shape[0], self.sequence_length, x_decode.shape[-1])
        x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_decoded = self.decoder(x_masked, idx_mask=idx_mask)  # [N, 1+L, Dd]
        x_pred = self.prediction_head(utils.get_at_index(x_decoded, idx_mask))  # [N, L-K, ppC]
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        return self.criterion(x_pred, target)


def lightly_indices(noise: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor]:
    """``lightly.models.utils.random_token_mask`` on a given noise [N, L] (the cls token, index
    0, always kept): (idx_keep [N, 1+K], idx_mask [N, L-K]) -- the patches mae-bench keeps."""
    noise = torch.cat([noise.new_full((noise.shape[0], 1), -1.0), noise], dim=1)  # [N, 1+L]
    order = torch.argsort(noise, dim=1)
    keep = 1 + len_keep(noise.shape[1] - 1, mask_ratio)
    return order[:, :keep], order[:, keep:]


def hf_mae(p: ArchPreset) -> nn.Module:
    """transformers' ViTMAEForPreTraining of the preset, norm_pix_loss, mask ratio 0.75."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(
        hidden_size=p.embed_dim, num_hidden_layers=p.depth, num_attention_heads=p.num_heads,
        intermediate_size=int(p.embed_dim * p.mlp_ratio), image_size=p.img_size,
        patch_size=p.patch_size, num_channels=3, qkv_bias=True,
        decoder_hidden_size=p.decoder_embed_dim, decoder_num_hidden_layers=p.decoder_depth,
        decoder_num_attention_heads=p.decoder_num_heads,
        decoder_intermediate_size=int(p.decoder_embed_dim * p.mlp_ratio),
        mask_ratio=MASK_RATIO, norm_pix_loss=True, layer_norm_eps=1e-6)  # official's eps
    return ViTMAEForPreTraining(cfg)


def load_official(path: Path) -> type[nn.Module]:
    """``MaskedAutoencoderViT`` of facebookresearch/mae's models_mae.py, on timm 1.x.

    The shim: the file's ``Block(..., qk_scale=None, ...)`` goes to a timm Block subclass that
    drops ``qk_scale`` (timm 0.3.2's scale override, None there: the default scale), and
    ``np.float`` (removed in NumPy 1.24, used by the checkout's util/pos_embed.py) is ``float``.
    """
    import numpy as np
    import timm.models.vision_transformer as tvit

    class Block(tvit.Block):
        def __init__(self, *args, qk_scale=None, **kwargs):
            if qk_scale is not None:
                raise ValueError(f"models_mae.py sets qk_scale={qk_scale}; timm 1.x has no such "
                                 "override, so this shim cannot reproduce it")
            super().__init__(*args, **kwargs)

    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]
    root = str(path.resolve().parent)
    sys.path.insert(0, root)  # its util/pos_embed.py
    spec = importlib.util.spec_from_file_location("models_mae", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    original, tvit.Block = tvit.Block, Block  # bound by the file's `from ... import Block`
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        tvit.Block = original
        sys.path.remove(root)
    return module.MaskedAutoencoderViT


# --- the checks ------------------------------------------------------------------------------


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, sum(p.numel() for p in model.parameters()) - train


def encoder_tokens(block: nn.Module, run: Callable[[], Tensor]) -> tuple[list[int], float]:
    """The sequence length of every call of ``block`` (an encoder's first block) in ``run``,
    and the loss ``run`` returns (no gradient)."""
    seen: list[int] = []

    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(int(x.shape[1]))

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            loss = float(run())
    finally:
        handle.remove()
    return seen, loss


@dataclass
class Check:
    name: str
    params: tuple[int, int]
    tokens: list[int]
    loss: float
    reference: float | None  # mae-bench's loss at the same weights and masking, when comparable


def check_row(c: Check, base: tuple[int, int]) -> str:
    diff = c.params[0] - base[0], c.params[1] - base[1]
    d = "same" if diff == (0, 0) else f"{diff[0]:+,} trainable, {diff[1]:+,} frozen"
    calls = f"{len(c.tokens)} x {sorted(set(c.tokens))[0]}" if len(set(c.tokens)) == 1 \
        else ", ".join(map(str, c.tokens))
    ref = "-" if c.reference is None else f"{c.reference:.6f} ({abs(c.loss - c.reference):.1e})"
    return (f"| {c.name} | {c.params[0]:,} | {c.params[1]:,} | {d} | {calls} | {c.loss:.6f} "
            f"| {ref} |")


# --- the configurations ------------------------------------------------------------------------


def plain_step(model: nn.Module, precision: str, loss_fn: Callable[[], Tensor]) -> Callable:
    """A user's loop: forward (and loss) under autocast, backward, AdamW, zero_grad."""
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    enabled = precision != "fp32"

    def step() -> Tensor:
        with torch.autocast("cpu", dtype=DTYPES[precision], enabled=enabled):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def engine_step(method: nn.Module, cfg: RunConfig, precision: str,
                forward: Callable[[], Tensor | dict[str, Tensor]]) -> Callable:
    """mae-bench's TrainStep (what ``mae-bench pretrain`` runs) around ``forward``."""
    device = torch.device("cpu")
    opt = build_optimizer(method, cfg.train, device)
    ts = build_train_step(cfg, method, opt, lambda _: LR, device=device, precision=precision,
                          total_steps=10**6, accum_iter=1)
    out: list[Tensor] = []

    def step() -> Tensor:
        ts.micro_batch(lambda: out.append(forward()) or out[-1])
        ts.flush(check=False)  # the engine flushes at log lines; one flush per step is dearer
        result = out.pop()
        return (result["loss"] if isinstance(result, dict) else result).detach()

    return step


def timm_attention(model: nn.Module, precision: str) -> str:
    fused = {getattr(m, "fused_attn", None) for m in model.modules() if hasattr(m, "fused_attn")}
    return "fused (timm default)" if fused == {True} else f"timm fused_attn={fused}"


def mae_cases(args, p: ArchPreset, images: Tensor, noise: Tensor, official: type | None,
              have: set[str]) -> tuple[list[Case], list[Check], list[str]]:
    """The MAE configurations (after their checks), the checks and the peers not measured."""
    torch.manual_seed(0)
    ref = build_mae(args.arch, norm_pix_loss=True).train()
    sd = ref.state_dict()
    with torch.no_grad():
        ref_loss = float(ref(images, MASK_RATIO, noise)[0])
        ref.norm_pix_loss = False
        ref_raw = float(ref(images, MASK_RATIO, noise)[0])
        ref.norm_pix_loss = True
    keep = lightly_indices(noise, MASK_RATIO)
    rule = {q: rule_path("cpu", DTYPES[q], 1 + len_keep(p.img_size**2 // p.patch_size**2,
                                                          MASK_RATIO)) for q in DTYPES}
    builders: dict[str, Callable[[], tuple[nn.Module, Callable[[nn.Module], Tensor]]]] = {}

    def mb():
        model = build_mae(args.arch, norm_pix_loss=True).train()
        model.load_state_dict(sd)
        return model, lambda m: m(images, MASK_RATIO, noise)[0]

    builders[MB] = mb
    if "lightly" in have:
        def lightly():
            model = LightlyMAE(p).train()
            model.load_state_dict(lightly_state_dict(sd, model.backbone.mask_token.data))
            return model, lambda m: m(images, *keep)
        builders[LIGHTLY] = lightly
    if "transformers" in have:
        def hf():
            model = hf_mae(p).train()
            model.load_state_dict(hf_state_dict(sd, p.depth, p.decoder_depth))
            return model, lambda m: m(pixel_values=images, noise=noise).loss
        builders[HF] = hf
    if official is not None:
        def off():
            model = official(img_size=p.img_size, patch_size=p.patch_size, in_chans=3,
                             embed_dim=p.embed_dim, depth=p.depth, num_heads=p.num_heads,
                             decoder_embed_dim=p.decoder_embed_dim, decoder_depth=p.decoder_depth,
                             decoder_num_heads=p.decoder_num_heads, mlp_ratio=p.mlp_ratio,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True)
            model.train().load_state_dict(sd)
            return model, lambda m: m(images, mask_ratio=MASK_RATIO)[0]
        builders[OFFICIAL] = off

    first_block = {MB: lambda m: m.blocks[0], LIGHTLY: lambda m: m.backbone.vit.blocks[0],
                   HF: lambda m: m.vit.layers[0], OFFICIAL: lambda m: m.blocks[0]}
    checks, cases = [], []
    for name, build in builders.items():
        model, fwd = build()
        if name == OFFICIAL:  # its forward draws torch.rand(N, L): replay that noise in mae-bench
            torch.manual_seed(1)
            official_noise = torch.rand(noise.shape)
            with torch.no_grad():
                reference = float(ref(images, MASK_RATIO, official_noise)[0])
            torch.manual_seed(1)
        else:
            reference = ref_raw if name == LIGHTLY else ref_loss
        tokens, loss = encoder_tokens(first_block[name](model), partial(fwd, model))
        checks.append(Check(name, count_params(model), tokens, loss,
                            None if name == MB else reference))
        for q in args.precisions:
            m, f = (model, fwd) if q == args.precisions[0] else build()
            attention = (f"rule: {rule[q]}" if name == MB else
                         m.config._attn_implementation if name == HF
                         else timm_attention(m, q))
            cases.append(Case(name, "MAE", q, plain_step(m, q, partial(f, m)), attention))
    cfg = resolve_config(RunConfig().replace(
        model={"arch": args.arch}, mae={"mask_ratio": MASK_RATIO},
        train={"method": "mae", "batch_size": args.batch_size}))
    for q in args.precisions:
        method = build_method(cfg, 3, p.img_size).train()
        method.mae.load_state_dict(sd)
        cases.append(Case(MB_ENGINE, "MAE", q, engine_step(
            method, cfg, q, lambda m=method: m.mae(images, MASK_RATIO, noise)[0]),
            f"rule: {rule[q]}"))
    missing = [n for n, pkg in ((LIGHTLY, "lightly"), (HF, "transformers")) if pkg not in have]
    return cases, checks, missing + ([] if official else [OFFICIAL])


class LightlySimCLR(nn.Module):
    """lightly's SimCLR example (examples/pytorch/simclr.py) with a timm ViT backbone."""

    def __init__(self, p: ArchPreset, hidden_dim: int, out_dim: int) -> None:
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = timm_vit(p)
        self.projection_head = SimCLRProjectionHead(p.embed_dim, hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


def simclr_cases(args, p: ArchPreset, views: list[Tensor], have: set[str]
                 ) -> tuple[list[Case], list[Check]]:
    cfg = resolve_config(RunConfig().replace(
        model={"arch": args.arch}, train={"method": "simclr", "batch_size": args.batch_size}))
    labels = torch.full((args.batch_size,), -1, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    batch = Batch(views, labels, gen)
    s = cfg.ssl
    rule = {q: rule_path("cpu", DTYPES[q], 1 + (p.img_size // p.patch_size) ** 2) for q in DTYPES}
    checks, cases = [], []

    def mb():
        torch.manual_seed(0)
        return build_method(cfg, 3, p.img_size).train()

    method = mb()
    tokens, loss = encoder_tokens(method.backbone.blocks[0], lambda: method(batch)["loss"])
    checks.append(Check("mae-bench SimCLR", count_params(method), tokens, loss, None))
    for q in args.precisions:
        m = method if q == args.precisions[0] else mb()
        cases.append(Case(MB, "SimCLR", q, plain_step(m, q, lambda m=m: m(batch)["loss"]),
                          f"rule: {rule[q]}"))
        e = mb()
        cases.append(Case(MB_ENGINE, "SimCLR", q, engine_step(e, cfg, q, lambda e=e: e(batch)),
                          f"rule: {rule[q]}"))
    if "lightly" in have:
        from lightly.loss import NTXentLoss

        criterion = NTXentLoss(temperature=s.temperature)

        def lightly():
            torch.manual_seed(0)
            return LightlySimCLR(p, s.proj_hidden_dim, s.proj_dim).train()

        def fwd(m: nn.Module) -> Tensor:
            z0, z1 = m(views[0]), m(views[1])  # the example: one backbone call per view
            return criterion(z0, z1)

        model = lightly()
        tokens, loss = encoder_tokens(model.backbone.blocks[0], partial(fwd, model))
        checks.append(Check("lightly SimCLR example", count_params(model), tokens, loss, None))
        for q in args.precisions:
            m = model if q == args.precisions[0] else lightly()
            cases.append(Case(LIGHTLY, "SimCLR", q, plain_step(m, q, partial(fwd, m)),
                              timm_attention(m, q)))
    return cases, checks


# --- timing and the report --------------------------------------------------------------------


def run_rounds(cases: list[Case], batch: int, rounds: int, warmup: int, steps: int) -> None:
    """Warm-up steps of every case, then round-robin rounds (order rotated) of timed steps."""
    for c in cases:
        for _ in range(warmup):
            c.step()
    for r in range(rounds):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for c in order:
            for _ in range(steps):
                start = time.perf_counter()
                loss = c.step()
                c.ips.append(batch / (time.perf_counter() - start))
                c.loss = float(loss)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo = int(i)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (i - lo)


def median(c: Case) -> float:
    return statistics.median(c.ips)


def iqr_ratio(c: Case) -> float:
    return quantile(c.ips, .75) / quantile(c.ips, .25)


def report(args, p: ArchPreset, cases: list[Case], checks: dict[str, list[Check]],
           missing: list[str], versions: str, elapsed: float) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# mae-bench against its peers: training speed ({args.arch})", "",
             f"- **When:** {now}, by `benchmarks/peers.py`.",
             f"- **Machine:** {cpu_summary()}; {torch.get_num_threads()} torch thread(s); host "
             f"allocator, for every implementation alike: {host_allocator()}.",
             f"- **Software:** {versions}.",
             f"- **Setup:** {args.arch} at {p.img_size} px, batch {args.batch_size}, mask ratio "
             f"{MASK_RATIO}; AdamW {ADAMW['betas']}, wd {ADAMW['weight_decay']}; the same input "
             f"tensors for all; {args.warmup} warm-up step(s) per configuration, then "
             f"{args.rounds} round-robin rounds x {args.steps} timed step(s); median img/s over "
             f"{args.rounds * args.steps} timed steps per row; IQR = p25-p75 img/s; spread = "
             f"p75 / p25 and slowest / fastest step; measured in {elapsed / 60:.1f} min.", "",
             "```bash", " ".join(["python", *sys.argv]), "```", ""]
    for task, rows in checks.items():
        base = rows[0].params
        lines += [f"## Checks, {task} (fp32, before timing)", "",
                  "| model | trainable params | frozen params | vs mae-bench | encoder calls x "
                  "tokens | loss | mae-bench at the same weights (abs diff) |",
                  "|---|---|---|---|---|---|---|", *(check_row(c, base) for c in rows), ""]
    for task in ("MAE", "SimCLR"):
        rows = sorted((c for c in cases if c.task == task),
                      key=lambda c: (ORDER.index(c.name), args.precisions.index(c.precision)))
        if not rows:
            continue
        lines += [f"## {task} training step", "",
                  "| implementation | precision | attention | img/s | IQR | spread p75/p25, "
                  "max/min | last loss | mae-bench / it | engine / it |", "|" + "---|" * 9]
        for c in rows:
            mine = {n: median(x) for x in rows if x.precision == c.precision
                    for n in [x.name] if n in (MB, MB_ENGINE)}
            ratio = [f"{mine[n] / median(c):.2f}x" if n in mine and c.name not in (MB, MB_ENGINE)
                     else "-" for n in (MB, MB_ENGINE)]
            lines.append(f"| {c.name} | {c.precision} | {c.attention} | {median(c):.1f} | "
                         f"{quantile(c.ips, .25):.1f}-{quantile(c.ips, .75):.1f} | "
                         f"{iqr_ratio(c):.2f}, {max(c.ips) / min(c.ips):.2f} | {c.loss:.4f} | "
                         f"{ratio[0]} | "
                         f"{ratio[1]} |")
        for name in missing if task == "MAE" else [n for n in missing if n == LIGHTLY]:
            why = "no --official-mae PATH" if name == OFFICIAL else "package not installed"
            lines.append(f"| {name} | - | - | not measured ({why}) | | | | | |")
        lines.append("")
    busy = max(cases, key=iqr_ratio, default=None)
    if busy is not None and iqr_ratio(busy) > BUSY_SPREAD:
        lines += [f"**Warning: the machine was busy: step times scattered by up to "
                  f"{iqr_ratio(busy):.2f}x (p75 / p25, {busy.name} {busy.task} "
                  f"{busy.precision}); the rounds were interleaved, so ratios stay fair, but "
                  "ratios within that scatter of 1.0 are ties.**", ""]
    lines += targets(cases, missing)
    return "\n".join(lines) + "\n"


def targets(cases: list[Case], missing: list[str]) -> list[str]:
    """Issue 20's targets: mae-bench's plain-loop row (engine step in brackets) over the peer."""
    get = {(c.task, c.name, c.precision): median(c) for c in cases}
    official = OFFICIAL if OFFICIAL not in missing else HF
    stand_in = "" if official == OFFICIAL else " (stand-in: transformers' port; official absent)"
    rows = [("MAE bf16 >= 1.5x official fp32" + stand_in, "MAE", "bf16", official, "fp32", 1.5),
            ("MAE fp32 >= 1.0x official fp32" + stand_in, "MAE", "fp32", official, "fp32", 1.0),
            ("MAE fp32 >= 1.0x lightly's example fp32", "MAE", "fp32", LIGHTLY, "fp32", 1.0),
            ("SimCLR fp32 >= 1.0x lightly's example fp32", "SimCLR", "fp32", LIGHTLY, "fp32", 1.0),
            ("SimCLR bf16 >= 1.0x lightly's example bf16", "SimCLR", "bf16", LIGHTLY, "bf16", 1.0)]
    out = ["## Targets (issue 20)", "", "| target | mae-bench (engine step) over the peer | met? |",
           "|---|---|---|"]
    for label, task, mine, peer, theirs, bar in rows:
        a, e, b = (get.get((task, MB, mine)), get.get((task, MB_ENGINE, mine)),
                   get.get((task, peer, theirs)))
        if a is None or b is None or e is None:
            out.append(f"| {label} | not measured | - |")
            continue
        met = "yes" if a / b >= bar else "no"
        out.append(f"| {label} | {a / b:.2f}x ({e / b:.2f}x) | {met} |")
    return out + [""]


def publish(text: str, markdown: Path | None) -> None:
    """Print the report, and write it to ``markdown`` when given."""
    print(text)
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(text)


def fail(message: str) -> None:
    """One line on stderr, exit 2 (bad arguments, a missing peer package)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_tiny_patch4")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6,
                    help="round-robin rounds: more, shorter rounds spread a busy machine best")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per configuration a round")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps of each configuration before the first round (lazy "
                         "init, kernel caches, the allocator)")
    ap.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    ap.add_argument("--tasks", default="mae,simclr")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 on a shared machine, with OMP_NUM_THREADS=1")
    ap.add_argument("--official-mae", type=Path, default=None,
                    help="models_mae.py of a facebookresearch/mae checkout (with its util/)")
    ap.add_argument("--skip-missing", action="store_true",
                    help="measure the rest when a peer package is missing (else exit 2)")
    ap.add_argument("--malloc", choices=("default", "retain"), default="default",
                    help="the host allocator for the whole process, so for every implementation "
                         "alike: glibc's own (default), or keeping freed memory as the mae-bench "
                         "command does (retain); benchmarks/host_memory.py compares the two")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    if args.malloc == "retain":
        keep_freed_memory()  # before anything is allocated

    args.precisions = args.precisions.split(",")
    tasks = args.tasks.split(",")
    bad = [q for q in args.precisions if q not in DTYPES] + [t for t in tasks
                                                             if t not in ("mae", "simclr")]
    have = {pkg for pkg in PEERS if importlib.util.find_spec(pkg) is not None}
    lacking = [pkg for pkg in PEERS if pkg not in have]
    if bad:
        fail(f"unknown precision or task {bad}; valid: fp32, bf16 / mae, simclr")
    if min(args.rounds, args.steps, args.batch_size - 1) < 1 or args.warmup < 0:
        fail("--rounds and --steps must be >= 1, --batch-size >= 2, --warmup >= 0")
    if args.official_mae is not None and not args.official_mae.is_file():
        fail(f"--official-mae {args.official_mae} is not a file; give models_mae.py "
                 "of a facebookresearch/mae checkout")
    if lacking and not args.skip_missing:
        fail(f"peer package(s) {', '.join(lacking)} missing: "
                 f"{' && '.join(PEERS[p] for p in lacking)} (or --skip-missing)")
    torch.set_num_threads(args.threads)
    p = get_preset(args.arch)
    official = load_official(args.official_mae) if args.official_mae else None
    versions = [f"torch {torch.__version__}", f"timm {timm.__version__}"]
    for pkg in sorted(have):
        versions.append(f"{pkg} {__import__(pkg).__version__}")

    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, p.img_size, p.img_size)
    pixels = [torch.randint(0, 256, shape, generator=gen).float() for _ in range(2)]
    images, view2 = [(x / 255 - 0.5) / 0.25 for x in pixels]  # normalised, as a loader gives
    noise = torch.rand(args.batch_size, (p.img_size // p.patch_size) ** 2, generator=gen)

    cases: list[Case] = []
    checks: dict[str, list[Check]] = {}
    missing = [LIGHTLY] if "lightly" in lacking else []
    if "mae" in tasks:
        mae, checks["MAE"], missing = mae_cases(args, p, images, noise, official, have)
        cases += mae
    if "simclr" in tasks:
        simclr, checks["SimCLR"] = simclr_cases(args, p, [images, view2], have)
        cases += simclr
    for rows in checks.values():
        print("\n".join(check_row(c, rows[0].params) for c in rows), file=sys.stderr)
    started = time.perf_counter()
    run_rounds(cases, args.batch_size, args.rounds, args.warmup, args.steps)
    text = report(args, p, cases, checks, missing, ", ".join(versions),
                  time.perf_counter() - started)
    publish(text, args.markdown)


if __name__ == "__main__":
    main()
