"""GTFormer's layers (METHOD.md section 1): the four global tokens and Global-Token Attention,
as subclasses of timm's ``Attention`` and ``Block`` (the model that assembles them is
:mod:`pro2sam.gtformer`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

__all__ = ["NUM_GLOBAL_TOKENS", "global_thumbnails", "GlobalTokenEmbed", "GTAttention", "GTBlock"]

# 2x2 pixel-unshuffle of one (2p x 2p) thumbnail gives four phase-shifted (p x p) views.
NUM_GLOBAL_TOKENS = 4


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
