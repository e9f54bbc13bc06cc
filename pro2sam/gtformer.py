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

Laid out as a timm family: this module holds the model and its presets (and the DeiT weights it
starts from); the layers are in :mod:`pro2sam.gtformer_layers`, the training loss beside the
trainer in :mod:`pro2sam.train.losses`, the export format in :mod:`pro2sam.gtformer_export`.
Every name those modules had here is still importable from here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import timm
import torch
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from .checkpoints import CheckpointError, load_state_dict
from .gtformer_export import (  # noqa: F401  (re-exported: the export format used to live here)
    CONFIG_FILE,
    CONFIG_FORMAT,
    CONFIG_VERSION,
    DEFAULT_SETTINGS,
    WEIGHTS_FILE,
    GTFormerSettings,
    gtformer_class_names,
    load_gtformer,
    save_gtformer,
)
from .gtformer_layers import NUM_GLOBAL_TOKENS, GlobalTokenEmbed, GTAttention, GTBlock, global_thumbnails
from .train.losses import AREA_LOSSES, area_loss, gtformer_loss, norm_blur_kernel, norm_loss  # noqa: F401  (re-exported)

__all__ = [
    "AREA_LOSSES",
    "GTFORMER_PRESETS",
    "NUM_GLOBAL_TOKENS",
    "GTFormer",
    "GTFormerOutput",
    "GTFormerSettings",
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
            url="", num_classes=1000, input_size=(3, DEFAULT_SETTINGS.img_size, DEFAULT_SETTINGS.img_size),
            mean=DEFAULT_SETTINGS.mean, std=DEFAULT_SETTINGS.std, first_conv="patch_embed.proj", classifier="head",
            fixed_input_size=True,
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
