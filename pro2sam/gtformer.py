"""GTFormer (stage 1): a DeiT with four global tokens whose attention gives the coarse foreground map.

Pro2SAM's first stage (METHOD.md section 1). A DeiT backbone (timm's ``VisionTransformer``,
``Block`` and ``Attention``) gets four extra tokens, each projected from a phase-shifted
thumbnail of the whole image. In every block, each global token's pre-softmax attention row,
averaged over heads and squashed by a sigmoid, scores every token (``m_k``); their mean ``m``
gates the keys of the last ``num_global_blocks`` blocks (Global-Token Attention, GTA). Averaged
over the last ``num_fused_layers`` blocks at the patch positions these scores are the global maps
``M_k`` and the coarse map ``M_b`` that stage 3 matches SAM's masks against. A 3x3 convolution
over the patch tokens followed by global average pooling classifies the image.

Presets (sizes in :data:`GTFORMER_PRESETS`) are timm models::

    model = timm.create_model("gtformer_deit_small_patch16_224", num_classes=200, pretrained=True)
    model = create_gtformer("gtformer_deit_small_patch16_224", num_classes=200,
                            backbone_checkpoint="deit_small_patch16_224-cd65a155.pth")
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import nn

from .checkpoints import CheckpointError, load_state_dict
from .storage import sha256_file, write_bytes_atomic

__all__ = [
    "AREA_LOSSES",
    "GTFORMER_PRESETS",
    "NUM_GLOBAL_TOKENS",
    "GTFormer",
    "GTFormerOutput",
    "GTAttention",
    "GTBlock",
    "GlobalTokenEmbed",
    "BackboneLoadReport",
    "global_thumbnails",
    "norm_blur_kernel",
    "area_loss",
    "norm_loss",
    "gtformer_loss",
    "create_gtformer",
    "create_deit_backbone",
    "load_backbone_checkpoint",
    "deit_to_gtformer_state_dict",
    "save_gtformer",
    "load_gtformer",
    "gtformer_class_names",
]

_logger = logging.getLogger(__name__)

# 2x2 pixel-unshuffle of one (2p x 2p) thumbnail gives four phase-shifted (p x p) views.
NUM_GLOBAL_TOKENS = 4

# The one place where preset sizes live. ``backbone`` names the timm DeiT weights (arch.tag) that
# ``pretrained=True`` loads; None means no released weights fit.
GTFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "gtformer_deit_tiny_patch16_224": dict(
        backbone="deit_tiny_patch16_224.fb_in1k", img_size=224, patch_size=16,
        embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1,
    ),
    "gtformer_deit_small_patch16_224": dict(
        backbone="deit_small_patch16_224.fb_in1k", img_size=224, patch_size=16,
        embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1,
    ),
    "gtformer_deit_base_patch16_224": dict(
        backbone="deit_base_patch16_224.fb_in1k", img_size=224, patch_size=16,
        embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1,
    ),
    # Trained from scratch on pro2sam.synthetic scenes and shipped with the package (pro2sam.shipped):
    # small enough to train in under 30 minutes on 2 CPU cores, same token layout.
    "gtformer_synthetic_patch16_224": dict(
        backbone=None, img_size=224, patch_size=16, embed_dim=128, depth=6, num_heads=4, drop_path_rate=0.05,
    ),
    # For tests: fast on a CPU, same token layout (14x14 patches + 4 global tokens).
    "gtformer_test_tiny": dict(
        backbone=None, img_size=224, patch_size=16, embed_dim=48, depth=4, num_heads=3, drop_path_rate=0.0,
    ),
}

CONFIG_FORMAT = "pro2sam.gtformer"
CONFIG_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------------------------
# Global tokens


def global_thumbnails(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Four phase-shifted low-resolution views of the whole image.

    The input is bilinearly resized to (2p, 2p) and split by a 2x2 pixel-unshuffle. Thumbnail k
    takes rows ``k // 2 :: 2`` and columns ``k % 2 :: 2``: in (column, row) parity that is
    even/even, odd/even, even/odd, odd/odd. Each covers the whole image, not a quadrant.

    Args:
        x: (B, 3, H, W) normalised images.
        patch_size: p.

    Returns:
        (B, 4, 3, p, p) thumbnails.
    """
    b, c = x.shape[:2]
    small = F.interpolate(x, size=(2 * patch_size, 2 * patch_size), mode="bilinear", align_corners=False)
    # pixel_unshuffle puts phase (i, j) of channel c at output channel c * 4 + i * 2 + j.
    phases = F.pixel_unshuffle(small, 2).view(b, c, NUM_GLOBAL_TOKENS, patch_size, patch_size)
    return phases.transpose(1, 2)


class GlobalTokenEmbed(nn.Module):
    """Four global tokens, each its own Conv2d(3, D, p, stride p) over one thumbnail.

    The authors' code shares one projection across the four thumbnails by accident; we give
    each its own (METHOD.md, [ours]).

    Args:
        patch_size: p; the thumbnails are p x p, so each projection yields one token.
        in_chans: image channels.
        embed_dim: D.
    """

    def __init__(self, *, patch_size: int, in_chans: int = 3, embed_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.ModuleList(
            nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, device=device, dtype=dtype)
            for _ in range(NUM_GLOBAL_TOKENS)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 4, D) global tokens (no position embedding)."""
        thumbs = global_thumbnails(x, self.patch_size)
        return torch.stack([proj(thumbs[:, k]).flatten(1) for k, proj in enumerate(self.proj)], dim=1)


# --------------------------------------------------------------------------------------------
# Global-Token Attention


class GTAttention(Attention):
    """timm's multi-head self-attention that also scores every token by the global tokens' attention.

    For each global token k (the last ``num_global_tokens`` tokens of the sequence),
    ``m_k = sigmoid(mean_h A_h[g_k, :])`` with ``A_h = Q_h K_h^T / sqrt(d)`` the pre-softmax
    logits of head h. With ``global_gating`` on (the global-aware blocks), ``m = mean_k m_k``
    gates the attention: ``softmax(A_h)`` with key column j multiplied by ``m_j``, not
    renormalised, then times V. Without it the attention is plain and m_k is only reported.

    Args:
        global_gating: gate the keys by m (Global-Token Attention).
        num_global_tokens: how many trailing tokens are global tokens.
        Other arguments: as timm's ``Attention``.
    """

    def __init__(
        self, dim: int, *, global_gating: bool = False, num_global_tokens: int = NUM_GLOBAL_TOKENS, **kwargs
    ) -> None:
        super().__init__(dim, **kwargs)
        if self.gate is not None:
            raise ValueError("GTAttention does not support timm's gated attention output")
        self.global_gating = global_gating
        self.num_global_tokens = num_global_tokens

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend.

        Args:
            x: (B, N, D) tokens; the last ``num_global_tokens`` are the global tokens.

        Returns:
            out: (B, N, D) attention output after the projection.
            global_maps: (B, G, N) m_k in (0, 1), for every token (class, patches, global).
        """
        if attn_mask is not None or is_causal:
            raise ValueError("GTAttention takes no attention mask")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        # Only the G global rows of A are needed for the maps: (B, H, G, N) -> (B, G, N).
        global_logits = (q[:, :, -self.num_global_tokens :] * self.scale) @ k.transpose(-2, -1)
        global_maps = global_logits.mean(dim=1).sigmoid()

        if self.global_gating:
            # softmax(A) with key column j scaled by m_j, times V, equals softmax(A) times the
            # value rows scaled by m_j; scaling V keeps the fused attention kernel usable.
            gate = global_maps.mean(dim=1)
            v = v * gate[:, None, :, None].to(v.dtype)

        dropout_p = self.attn_drop.p if self.training else 0.0
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = self.attn_drop(attn) @ v
        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        out = self.proj_drop(self.proj(self.norm(out)))
        return out, global_maps


class GTBlock(Block):
    """timm's pre-norm transformer block with :class:`GTAttention`; also returns m_k.

    Built by ``VisionTransformer`` with ``depth`` = the block's index; blocks with an index of
    at least ``first_global_block`` are global-aware (their attention is gated by m).

    Args:
        first_global_block: index of the first global-aware block.
        Other arguments: as timm's ``Block``.
    """

    def __init__(self, *args, first_global_block: int, depth: int = 0, **kwargs) -> None:
        kwargs["attn_layer"] = GTAttention
        super().__init__(*args, depth=depth, **kwargs)
        self.attn.global_gating = depth >= first_global_block

    @property
    def global_aware(self) -> bool:
        return self.attn.global_gating

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """(B, N, D) tokens -> (B, N, D) tokens and (B, G, N) m_k."""
        attended, global_maps = self.attn(self.norm1(x))
        x = x + self.drop_path1(self.ls1(attended))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, global_maps


# --------------------------------------------------------------------------------------------
# The model


class GTFormerOutput(NamedTuple):
    """What GTFormer returns for a batch (h, w = the patch grid, 14x14 for 224 input).

    Attributes:
        logits: (B, C) class logits.
        coarse_map: (B, h, w) coarse foreground map M_b in (0, 1): m averaged over the fused blocks.
        global_maps: (B, 4, h, w) global maps M_k in (0, 1): m_k averaged over the fused blocks.
        block_global_maps: (B, L, 4, N) m_k of every block for every token (class, h*w patches,
            4 global tokens); m of block l is ``block_global_maps[:, l].mean(1)``.
    """

    logits: torch.Tensor
    coarse_map: torch.Tensor
    global_maps: torch.Tensor
    block_global_maps: torch.Tensor


class GTFormer(VisionTransformer):
    """DeiT + four global tokens + Global-Token Attention + convolutional classifier.

    Tokens, in order: class token, h*w patch tokens, 4 global tokens. The class token and
    patches use the (pretrained) ``pos_embed``; the global tokens a new learned
    ``global_pos_embed`` (4 x D). The class token's output is unused.

    Args:
        num_classes: C, classes of the convolutional classifier.
        num_global_blocks: how many of the last blocks use Global-Token Attention.
        num_fused_layers: how many of the last blocks' m_k are averaged into the maps.
        Other arguments: as timm's ``VisionTransformer`` (img_size, patch_size, embed_dim, depth,
            num_heads, mlp_ratio, qkv_bias, drop_path_rate, ...). Options that change the token
            layout (no class token, register tokens, dynamic sizes, patch dropout, pooling
            heads) are not supported.
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        num_global_blocks: int = 3,
        num_fused_layers: int = 3,
        depth: int = 12,
        qkv_bias: bool = True,
        **kwargs,
    ) -> None:
        layout_changes = {
            "class_token": not kwargs.get("class_token", True),
            "reg_tokens": kwargs.get("reg_tokens", 0) > 0,
            "no_embed_class": kwargs.get("no_embed_class", False),
            "dynamic_img_size": kwargs.get("dynamic_img_size", False),
            "patch_drop_rate": kwargs.get("patch_drop_rate", 0.0) > 0,
            "global_pool": kwargs.get("global_pool", "") != "",
            "pos_embed": kwargs.get("pos_embed", "learn") != "learn",
            "block_fn": "block_fn" in kwargs,
            "attn_layer": "attn_layer" in kwargs,
        }
        for key, unsupported in layout_changes.items():
            if unsupported:
                raise ValueError(f"GTFormer does not support {key}={kwargs[key]!r}")
        if not 0 <= num_global_blocks <= depth:
            raise ValueError(f"num_global_blocks must be in [0, {depth}], got {num_global_blocks}")
        if not 1 <= num_fused_layers <= depth:
            raise ValueError(f"num_fused_layers must be in [1, {depth}], got {num_fused_layers}")
        kwargs.pop("global_pool", None)
        super().__init__(
            num_classes=0,  # the Linear head is replaced by the convolutional classifier below
            global_pool="",
            depth=depth,
            qkv_bias=qkv_bias,
            block_fn=partial(GTBlock, first_global_block=depth - num_global_blocks),
            **kwargs,
        )
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.num_global_blocks = num_global_blocks
        self.num_fused_layers = num_fused_layers
        self.grid_size = tuple(self.patch_embed.grid_size)
        patch = self.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"GTFormer needs square patches, got {patch}")
        self.global_embed = GlobalTokenEmbed(
            patch_size=patch[0], in_chans=self.in_chans, embed_dim=self.embed_dim, **dd
        )
        self.global_pos_embed = nn.Parameter(torch.empty(1, NUM_GLOBAL_TOKENS, self.embed_dim, **dd))
        trunc_normal_(self.global_pos_embed, std=0.02)
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, **dd)

    def _make_head(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return nn.Conv2d(self.embed_dim, num_classes, 3, padding=1, device=device, dtype=dtype)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the convolutional classifier by a fresh one for ``num_classes`` classes."""
        if global_pool not in (None, ""):
            raise ValueError("GTFormer pools its class map by averaging; global_pool is not supported")
        weight = next(self.parameters())
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, device=weight.device, dtype=weight.dtype)
        self.head.train(self.training)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"global_pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed|norm_pre|global_embed|global_pos_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """Run the transformer.

        Args:
            x: (B, 3, H, W) normalised images, H and W the model's img_size.

        Returns:
            tokens: (B, 1 + h*w + 4, D) final-LayerNorm tokens (class, patches, global).
            block_global_maps: (B, L, 4, 1 + h*w + 4) m_k of every block.
        """
        tokens = self._pos_embed(self.patch_embed(x))
        global_tokens = self.pos_drop(self.global_embed(x) + self.global_pos_embed)
        tokens = self.norm_pre(torch.cat([tokens, global_tokens], dim=1))
        per_block = []
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                tokens, global_maps = torch.utils.checkpoint.checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens, global_maps = block(tokens)
            per_block.append(global_maps)
        return self.norm(tokens), torch.stack(per_block, dim=1)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # type: ignore[override]
        """(B, N, D) final tokens -> (B, C) logits (or the (B, D, h, w) patch features)."""
        features = self.patch_features(tokens)
        if pre_logits:
            return features
        return self.head(self.head_drop(features)).mean(dim=(2, 3))

    def patch_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, D, h, w) patch tokens on their grid."""
        h, w = self.grid_size
        patches = tokens[:, self.num_prefix_tokens : self.num_prefix_tokens + h * w]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def fuse_maps(self, block_global_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, 4, N) per-block m_k -> coarse map (B, h, w) and global maps (B, 4, h, w)."""
        h, w = self.grid_size
        start = self.num_prefix_tokens
        fused = block_global_maps[:, -self.num_fused_layers :, :, start : start + h * w].mean(dim=1)
        global_maps = fused.reshape(fused.shape[0], NUM_GLOBAL_TOKENS, h, w)
        return global_maps.mean(dim=1), global_maps

    def forward(self, x: torch.Tensor) -> GTFormerOutput:  # type: ignore[override]
        """(B, 3, H, W) normalised images -> :class:`GTFormerOutput` (logits, maps)."""
        tokens, block_global_maps = self.forward_features(x)
        coarse_map, global_maps = self.fuse_maps(block_global_maps)
        return GTFormerOutput(self.forward_head(tokens), coarse_map, global_maps, block_global_maps)


# --------------------------------------------------------------------------------------------
# Losses


def norm_blur_kernel(kernlen: int = 3, nsig: float = 6.0, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """(kernlen, kernlen) blur of L_norm: the authors' ``get_kernel(kernlen, nsig)``, sum 1.

    Normal-CDF mass of ``kernlen`` equal bins spanning ``[-nsig - i/2, nsig + i/2]`` with
    ``i = (2 nsig + 1) / kernlen``; the kernel is ``sqrt(outer(c, c))`` normalised. At the
    defaults the bins are so wide that the weights are about 0.805 (centre), 0.046 (edge) and
    0.0026 (corner): nearly an identity with a thin halo, not a wide Gaussian (METHOD.md §1).
    """
    interval = (2 * nsig + 1) / kernlen
    x = torch.linspace(-nsig - interval / 2, nsig + interval / 2, kernlen + 1, dtype=torch.float64)
    c = torch.diff(torch.special.ndtr(x))
    kernel = torch.sqrt(torch.outer(c, c))
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


AREA_LOSSES = ("batch", "image")


def area_loss(maps: torch.Tensor, tau: float, *, per: str = "batch") -> torch.Tensor:
    """L_area per map: ``per="batch"`` is the authors' |mean over batch and pixels of M - tau|;
    ``per="image"`` **[ours]** is the mean over images of |mean over pixels of M_i - tau|.

    The batch form is met by a map that is all ones on a tau share of the images and all zeros on
    the rest; a backbone that already tells the classes apart (ours, pretrained on
    :mod:`pro2sam.synthetic_pretrain`) finds that solution: its map became a class code (two
    classes of ten all ones, the others all zeros) instead of a foreground map. The image form asks
    every image for a tau share of foreground.

    Args:
        maps: (B, K, h, w).
        tau: target foreground share.
        per: "batch" or "image".

    Returns:
        (K,) one loss per map.
    """
    if per == "batch":
        return (maps.mean(dim=(0, 2, 3)) - tau).abs()
    if per == "image":
        return (maps.mean(dim=(2, 3)) - tau).abs().mean(dim=0)
    raise ValueError(f"area loss per {per!r}: choose from {AREA_LOSSES}")


def norm_loss(maps: torch.Tensor) -> torch.Tensor:
    """L_norm = mean of G(M) (1 - G(M)) per map, G the fixed 3x3 blur :func:`norm_blur_kernel`
    with zero padding 1.

    Pushes the (barely) blurred map towards 0 or 1. Args: maps (B, K, h, w). Returns (K,).
    """
    b, k, h, w = maps.shape
    kernel = norm_blur_kernel(dtype=maps.dtype, device=maps.device).view(1, 1, 3, 3)
    blurred = F.conv2d(maps.reshape(b * k, 1, h, w), kernel, padding=1).view(b, k, h, w)
    return (blurred * (1 - blurred)).mean(dim=(0, 2, 3))


def gtformer_loss(
    output: GTFormerOutput,
    targets: torch.Tensor,
    *,
    tau: float = 0.25,
    area_weight: float = 1.0,
    global_weight: float = 0.5,
    area_per: str = "batch",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GTFormer's training loss (11 terms).

    ``L = CE + area_weight * (L_area(M_b) + L_norm(M_b)) + global_weight * sum_k (L_area(M_k) + L_norm(M_k))``

    Args:
        output: the model's output (logits, coarse map M_b, global maps M_k).
        targets: (B,) int64 class indices.
        tau: target mean foreground fraction (0.25 for CUB-like data, 0.35 for ImageNet-like).
        area_weight: weight of the coarse map's two terms.
        global_weight: weight of each global map's two terms.
        area_per: "batch" (the authors') or "image" (**[ours]**), see :func:`area_loss`.

    Returns:
        total: scalar loss (float32).
        terms: the unweighted terms, scalar tensors: ``ce``, ``area_coarse``, ``norm_coarse``,
            ``area_global{k}`` and ``norm_global{k}`` for k in 0..3.
    """
    coarse = output.coarse_map.float().unsqueeze(1)
    global_maps = output.global_maps.float()
    ce = F.cross_entropy(output.logits.float(), targets)
    area_coarse, norm_coarse = area_loss(coarse, tau, per=area_per)[0], norm_loss(coarse)[0]
    area_global, norm_global = area_loss(global_maps, tau, per=area_per), norm_loss(global_maps)
    total = ce + area_weight * (area_coarse + norm_coarse) + global_weight * (area_global + norm_global).sum()
    terms = {"ce": ce, "area_coarse": area_coarse, "norm_coarse": norm_coarse}
    for k in range(global_maps.shape[1]):
        terms[f"area_global{k}"] = area_global[k]
        terms[f"norm_global{k}"] = norm_global[k]
    return total, terms


# --------------------------------------------------------------------------------------------
# DeiT backbone weights


class BackboneLoadReport(NamedTuple):
    """What :func:`load_backbone_checkpoint` did.

    Attributes:
        loaded: model keys taken from the checkpoint.
        initialised: GTFormer's own keys the checkpoint cannot hold (global token projections and
            positions, convolutional classifier); they keep their fresh initialisation.
        ignored: checkpoint keys with no place in GTFormer (DeiT head, distillation token, ...).
    """

    loaded: list[str]
    initialised: list[str]
    ignored: list[str]


# Keys that only GTFormer has; a DeiT checkpoint never holds them.
_GTFORMER_ONLY = ("global_embed.", "global_pos_embed", "head.")
# DeiT keys with no counterpart: the Linear head, the distillation token and its head.
_DEIT_ONLY = ("head.", "head_dist.", "dist_token", "fc_norm.", "pre_logits.")


def _split_deit_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: GTFormer
) -> tuple[dict[str, torch.Tensor], BackboneLoadReport]:
    """Map a DeiT / ViT state dict onto GTFormer's keys; see :func:`deit_to_gtformer_state_dict`."""
    state = dict(state_dict)
    if "dist_token" in state and "pos_embed" in state:
        # Distilled DeiT: pos_embed covers [cls, dist, patches]; keep [cls, patches].
        pos = state["pos_embed"]
        state["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    ignored = sorted(k for k in state if k.startswith(_DEIT_ONLY))
    for key in ignored:
        del state[key]
    state = checkpoint_filter_fn(state, model)  # timm's conversions: patch-embed and position resizing

    own = model.state_dict()
    initialised = sorted(k for k in own if k.startswith(_GTFORMER_ONLY))
    expected = [k for k in own if not k.startswith(_GTFORMER_ONLY)]
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in own or k.startswith(_GTFORMER_ONLY))
    wrong_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in expected
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} backbone keys missing (e.g. {', '.join(missing[:5])})")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} shape mismatches (e.g. {'; '.join(wrong_shape[:3])})")
        raise CheckpointError(
            "the checkpoint does not fit this GTFormer's DeiT backbone: " + "; ".join(problems)
            + ". Is it a DeiT/ViT checkpoint of the same size (embed_dim, depth, patch size)?"
        )
    mapped = {k: state[k] for k in expected}
    mapped.update({k: own[k] for k in initialised})
    return mapped, BackboneLoadReport(loaded=expected, initialised=initialised, ignored=ignored + unexpected)


def deit_to_gtformer_state_dict(state_dict: Mapping[str, torch.Tensor], model: GTFormer) -> dict[str, torch.Tensor]:
    """A complete GTFormer state dict: the backbone from a DeiT/ViT state dict, the rest from ``model``.

    Drops the DeiT head and distillation token (and its position), lets timm resize the patch
    embedding and positions if needed, and fills GTFormer's own parameters (global token
    projections and positions, convolutional classifier) with ``model``'s current values, so the
    result loads strictly. Also timm's ``pretrained_filter_fn`` for ``pretrained=True``.

    Raises:
        CheckpointError: backbone keys are missing or have the wrong shape.
    """
    mapped, report = _split_deit_state_dict(state_dict, model)
    if report.ignored:
        _logger.info("DeiT checkpoint keys not used by GTFormer: %s", ", ".join(report.ignored))
    return mapped


def create_deit_backbone(name: str, *, num_classes: int, **overrides) -> VisionTransformer:
    """The plain timm DeiT (ViT, class-token head) of preset ``name``'s sizes.

    Its state dict is in timm's DeiT format (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
    ``blocks.N.*``, ``norm.*``, ``head.*``), the format :func:`load_backbone_checkpoint` reads:
    what a backbone pretrained for a preset without released weights is trained as
    (``scripts/pretrain_backbone.py``).

    Args:
        name: a key of :data:`GTFORMER_PRESETS`.
        num_classes: classes of the pretraining task (the Linear head on the class token).
        overrides: ``VisionTransformer`` arguments (``dynamic_img_size``, ``drop_path_rate``, ...).
    """
    if name not in GTFORMER_PRESETS:
        raise ValueError(f"unknown GTFormer preset {name!r}; choose from {sorted(GTFORMER_PRESETS)}")
    spec = {k: v for k, v in GTFORMER_PRESETS[name].items() if k != "backbone"}
    return VisionTransformer(num_classes=num_classes, qkv_bias=True, global_pool="token", **{**spec, **overrides})


def load_backbone_checkpoint(model: GTFormer, path: str | os.PathLike) -> BackboneLoadReport:
    """Load a local DeiT/ViT checkpoint (.pth or .safetensors) into GTFormer's backbone, in place.

    Raises:
        CheckpointError: the file is unreadable (see :func:`pro2sam.checkpoints.load_state_dict`)
            or does not fit the backbone.
    """
    state = load_state_dict(path, what="DeiT backbone checkpoint")
    try:
        mapped, report = _split_deit_state_dict(state, model)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.load_state_dict(mapped, strict=True)
    if report.ignored:
        _logger.info("%s: keys not used by GTFormer: %s", path, ", ".join(report.ignored))
    return report


# --------------------------------------------------------------------------------------------
# Presets


def _deit_pretrained_cfg(tag: str | None) -> dict[str, Any]:
    if tag is None:
        return dict(
            url="", num_classes=1000, input_size=(3, 224, 224), mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head", fixed_input_size=True,
        )
    cfg = get_pretrained_cfg(tag).to_dict()
    cfg.pop("architecture", None)
    cfg.pop("tag", None)
    return cfg


# Each preset's pretrained weights are its DeiT's (same hub files, tag and preprocessing).
default_cfgs = generate_default_cfgs({
    (f"{name}.{spec['backbone'].split('.', 1)[1]}" if spec["backbone"] else name):
        _deit_pretrained_cfg(spec["backbone"])
    for name, spec in GTFORMER_PRESETS.items()
})

# Factory arguments that are about building or loading, not the architecture.
_NOT_ARCHITECTURE = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "device", "dtype", "num_classes")


def _create_gtformer(variant: str, pretrained: bool = False, **kwargs) -> GTFormer:
    spec = {k: v for k, v in GTFORMER_PRESETS[variant].items() if k != "backbone"}
    overrides = {k: v for k, v in kwargs.items() if k not in _NOT_ARCHITECTURE and v is not None}
    if pretrained and GTFORMER_PRESETS[variant]["backbone"] is None:
        raise ValueError(f"{variant} has no pretrained backbone weights")
    model = build_model_with_cfg(
        GTFormer,
        variant,
        pretrained,
        pretrained_filter_fn=deit_to_gtformer_state_dict,
        **{**spec, **kwargs},
    )
    model.preset = variant
    model.preset_overrides = overrides
    return model


@register_model
def gtformer_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> GTFormer:
    """GTFormer on DeiT-Tiny/16 (D=192, 12 blocks, 3 heads)."""
    return _create_gtformer("gtformer_deit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def gtformer_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> GTFormer:
    """GTFormer on DeiT-Small/16 (D=384, 12 blocks, 6 heads), the paper's model."""
    return _create_gtformer("gtformer_deit_small_patch16_224", pretrained, **kwargs)


@register_model
def gtformer_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> GTFormer:
    """GTFormer on DeiT-Base/16 (D=768, 12 blocks, 12 heads)."""
    return _create_gtformer("gtformer_deit_base_patch16_224", pretrained, **kwargs)


@register_model
def gtformer_synthetic_patch16_224(pretrained: bool = False, **kwargs) -> GTFormer:
    """A 6-block, D=128 GTFormer trained from scratch on synthetic scenes; no pretrained weights."""
    return _create_gtformer("gtformer_synthetic_patch16_224", pretrained, **kwargs)


@register_model
def gtformer_test_tiny(pretrained: bool = False, **kwargs) -> GTFormer:
    """A 4-block, D=48 GTFormer for tests; no pretrained weights."""
    return _create_gtformer("gtformer_test_tiny", pretrained, **kwargs)


def create_gtformer(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = False,
    backbone_checkpoint: str | os.PathLike | None = None,
    **overrides,
) -> GTFormer:
    """Build a GTFormer preset.

    Args:
        name: a key of :data:`GTFORMER_PRESETS`.
        num_classes: classes of the classifier.
        pretrained: load ImageNet DeiT weights into the backbone through timm (needs network
            access or timm's cache).
        backbone_checkpoint: a local DeiT/ViT checkpoint (.pth or .safetensors) for the backbone,
            read without executing pickled code; exclusive with ``pretrained``.
        overrides: GTFormer / VisionTransformer arguments (``drop_path_rate``,
            ``num_global_blocks``, ``num_fused_layers``, ``device``, ...).

    Raises:
        ValueError: unknown preset or both weight sources given.
        CheckpointError: ``backbone_checkpoint`` is unreadable or does not fit.
    """
    if name not in GTFORMER_PRESETS:
        raise ValueError(f"unknown GTFormer preset {name!r}; choose from {sorted(GTFORMER_PRESETS)}")
    if pretrained and backbone_checkpoint is not None:
        raise ValueError("give either pretrained=True or backbone_checkpoint, not both")
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **overrides)
    if backbone_checkpoint is not None:
        load_backbone_checkpoint(model, backbone_checkpoint)
    return model


# --------------------------------------------------------------------------------------------
# Our own checkpoints: model.safetensors + config.json


def save_gtformer(
    model: GTFormer,
    path_dir: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Export a GTFormer built by :func:`create_gtformer` (or ``timm.create_model``).

    Writes ``path_dir/model.safetensors`` (the state dict) and ``path_dir/config.json``
    (``format``, ``version``, ``preset``, ``num_classes``, ``class_names``, ``img_size``,
    ``mean``, ``std``, ``overrides``, ``extra``); each file is written under a temporary name and
    renamed, so a reader never sees half a file.

    Args:
        class_names: one name per class, index-aligned with the logits.
        mean, std: the RGB normalisation (on [0, 1] pixels) the model was trained with.
        extra: JSON-serialisable details to keep (training run, data set, metrics, ...).

    Returns:
        The directory.
    """
    from safetensors.torch import save

    preset = getattr(model, "preset", None)
    if preset not in GTFORMER_PRESETS:
        raise ValueError("save_gtformer needs a GTFormer built from a preset (create_gtformer or timm.create_model)")
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
    config = {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "preset": preset,
        "num_classes": model.num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "img_size": int(model.patch_embed.img_size[0]),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "overrides": dict(model.preset_overrides),
        "extra": dict(extra) if extra is not None else None,
    }
    try:
        config_text = json.dumps(config, indent=2)
    except TypeError as e:
        raise ValueError(f"GTFormer config is not JSON-serialisable (overrides or extra?): {e}") from None

    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(str(path_dir / WEIGHTS_FILE), save(state, metadata={"format": "pt"}))
    write_bytes_atomic(str(path_dir / CONFIG_FILE), (config_text + "\n").encode())
    return path_dir


def gtformer_class_names(gtformer: str | os.PathLike) -> list[str] | None:
    """``class_names`` of a GTFormer export (folder, ``config.json`` or weights file; local or
    URI), read from its ``config.json`` without loading the model; None if it has none."""
    from .storage import join_uri, read_bytes

    uri = os.fspath(gtformer)
    if not uri.rstrip("/").endswith(".json"):
        if uri.endswith(".safetensors"):
            uri = uri.rsplit("/", 1)[0] if "/" in uri else "."
        uri = join_uri(uri, CONFIG_FILE)
    names = json.loads(read_bytes(uri)).get("class_names")
    return list(names) if names else None


def _check_config(config: dict[str, Any], config_path: Path) -> None:
    """Raise CheckpointError for a config whose values would break or silently spoil labeling."""

    def bad(message: str) -> None:
        raise CheckpointError(f"GTFormer config {config_path}: {message}")

    num_classes = config.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        bad(f"num_classes must be a positive integer, not {num_classes!r}")
    names = config.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            bad("class_names must be a list of strings")
        if len(names) != num_classes:
            bad(f"class_names has {len(names)} names for {num_classes} classes")
    img_size = config.get("img_size", 224)
    patch = GTFORMER_PRESETS[config["preset"]].get("patch_size", 16)
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < patch or img_size % patch:
        bad(f"img_size must be a positive multiple of the patch size {patch}, not {img_size!r}")
    for key, default in (("mean", (0.485, 0.456, 0.406)), ("std", (0.229, 0.224, 0.225))):
        values = config.get(key, default)
        if (
            not isinstance(values, (list, tuple)) or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        ):  # fmt: skip
            bad(f"{key} must be three finite numbers, not {values!r}")
        if key == "std" and min(values) <= 0:
            bad(f"std must be positive, not {values!r} (the normalised image would be infinite)")


def load_gtformer(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[GTFormer, dict[str, Any]]:
    """Load a GTFormer export written by :func:`save_gtformer`, in eval mode.

    Args:
        path: the export directory, or its ``model.safetensors`` / ``config.json``.
        device: where to put the model.

    Returns:
        model: the GTFormer, eval mode.
        config: ``config.json``'s contents plus ``sha256`` (of the weights file) and
            ``weights_path``.

    Raises:
        CheckpointError: a file is missing, unreadable or truncated, the config is not a GTFormer
            config, or the weights' keys or shapes do not match the configured model exactly.
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights_path, config_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    if path.is_file() and path.suffix == ".safetensors":
        weights_path = path
    if not config_path.is_file():
        raise CheckpointError(f"GTFormer config not found: {config_path} (expected beside {weights_path.name})")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"GTFormer config {config_path} is not readable JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise CheckpointError(f"{config_path} is not a GTFormer config (format != {CONFIG_FORMAT!r})")
    if config.get("preset") not in GTFORMER_PRESETS:
        raise CheckpointError(f"{config_path} names unknown GTFormer preset {config.get('preset')!r}")
    _check_config(config, config_path)

    state = load_state_dict(weights_path, what="GTFormer checkpoint")
    model = create_gtformer(config["preset"], num_classes=int(config["num_classes"]), **config.get("overrides") or {})
    if int(config.get("img_size", 224)) != int(model.patch_embed.img_size[0]):
        raise CheckpointError(
            f"GTFormer config {config_path}: img_size {config.get('img_size')} differs from the model's "
            f"{model.patch_embed.img_size[0]}"
        )
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong_shape:
            problems.append(f"shape mismatches {wrong_shape[:3]}")
        raise CheckpointError(
            f"GTFormer checkpoint {weights_path} does not match its config {config_path} "
            f"(preset {config['preset']}, {config['num_classes']} classes): " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    config = dict(config, sha256=sha256_file(weights_path), weights_path=str(weights_path))
    return model.to(device).eval(), config
